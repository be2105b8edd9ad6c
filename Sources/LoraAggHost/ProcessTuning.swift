import Foundation
import LoraAggCore

/// Process-wide settings for aggregation workloads.
public enum ProcessTuning {
    /// Everything a program that aggregates modules in parallel should call once at start-up.
    public static func configureForParallelModules() {
        keepLargeAllocations()
        Kernels.useSingleThreadedBLAS()
    }

    /// Keeps freed result buffers in the heap instead of returning them to the kernel.
    ///
    /// Every module's result (a few MB at rank 64 on 4096-wide modules) is
    /// allocated by the plugin, copied by the host and freed, hundreds of times
    /// per round. With glibc's defaults those buffers are mmapped and munmapped
    /// each time, and page faults then cost more than the arithmetic (measured:
    /// 0.3× → 0.9× memcpy on the mixed-rank benchmark). Raising the mmap and trim
    /// thresholds to 256 MB / 1 GB keeps them in the heap for reuse. glibc's
    /// `mallopt` is looked up at run time because Swift's Glibc module does not
    /// export it; on other C libraries this does nothing.
    public static func keepLargeAllocations() {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
        typealias MallOpt = @convention(c) (Int32, Int32) -> Int32
        let mallopt = unsafeBitCast(symbol, to: MallOpt.self)
        let trimThreshold: Int32 = -1, mmapThreshold: Int32 = -3  // M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
        _ = mallopt(mmapThreshold, 256 << 20)
        _ = mallopt(trimThreshold, 1 << 30)
    }
}
