import CLoraAggABI
import Foundation
import Logging
import LoraAggCore

/// The services table handed to every plugin's `create`.
enum HostServices {
    static let logger = Logger(label: "lora-agg.plugin")

    /// Allocated once and never freed: plugins may keep the pointer until process exit.
    nonisolated(unsafe) static let table: UnsafePointer<lora_agg_host_api> = {
        let table = UnsafeMutablePointer<lora_agg_host_api>.allocate(capacity: 1)
        table.initialize(to: lora_agg_host_api(
            struct_size: UInt32(MemoryLayout<lora_agg_host_api>.size),
            abi_major: UInt32(LORA_AGG_ABI_MAJOR), abi_minor: UInt32(LORA_AGG_ABI_MINOR), reserved: 0,
            factored_svd: factoredSVD, log: log))
        return UnsafePointer(table)
    }()

    private static let log: @convention(c) (Int32, UnsafePointer<CChar>) -> Void = { level, message in
        let text = Logger.Message(stringLiteral: String(cString: message))
        switch level {
        case ..<1: HostServices.logger.debug(text)
        case 1: HostServices.logger.info(text)
        default: HostServices.logger.warning(text)
        }
    }

    private static let factoredSVD: @convention(c) (UInt32, UnsafePointer<Double>, UnsafePointer<UInt32>,
                                                    UnsafePointer<UnsafePointer<Float>>, UnsafePointer<UnsafePointer<Float>>,
                                                    UInt64, UInt64, UInt32, UnsafeMutablePointer<Float>,
                                                    UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>,
                                                    UnsafeMutablePointer<CChar>, Int) -> lora_agg_status = {
        count, weights, ranks, bs, as_, dOut, dIn, keep, u, sigma, vt, message, capacity in
        let text = "factored_svd is not available in this host build"
        _ = text.withCString { strncpy(message, $0, capacity) }
        if capacity > 0 { message[capacity - 1] = 0 }
        return LORA_AGG_UNSUPPORTED
    }
}
