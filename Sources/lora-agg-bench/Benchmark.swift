import ArgumentParser
import Dispatch
import Foundation
import LoraAggCore
import LoraAggHost

/// `lora-agg-bench`: one LLaMA-7B-shaped round per strategy, measured against memcpy in the same run.
@main
struct Benchmark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-agg-bench",
        abstract: "Time one aggregation round per strategy and compare it with a memcpy of the same bytes.",
        discussion: """
            Defaults are one LLaMA-7B-shaped round: 128 modules of 4096x4096, rank 16, 10 clients \
            (0.67 GB of client factors). Machines are noisy, so every figure is reported as a ratio \
            to a plain memcpy of the input bytes measured in the same run. Build in release first: \
            `swift build -c release && .build/release/lora-agg-bench`.
            """)

    @Option(help: "Number of modules.") var modules = 128
    @Option(help: "d_out of every module.") var dOut = 4096
    @Option(help: "d_in of every module.") var dIn = 4096
    @Option(help: "Clients per round.") var clients = 10
    @Option(help: "Rank of every client (homogeneous round).") var rank = 16
    @Option(help: "Comma-separated ranks cycled over the clients of the heterogeneous round.") var mixedRanks = "4,8,16,32,64"
    @Option(help: "Timed repetitions per strategy; the best is reported.") var repeats = 3
    @Option(parsing: .upToNextOption, help: "Strategies to run (default: every loaded strategy except templates).") var strategies: [String] = []
    @Option(name: .customLong("variant"), help: ArgumentHelp("An extra row: a strategy with parameters, e.g. 'lora-fair:diagnostics=false' (repeatable; 'none' for no extra rows).", valueName: "name:key=value,..."))
    var variants: [String] = ["fedex-lora:diagnostics=false", "lora-fair:diagnostics=false"]
    @Flag(help: "Skip the heterogeneous-rank round.") var homogeneousOnly = false
    @Option(help: ArgumentHelp("Python interpreter with numpy for the reference timings ('' to skip).", valueName: "python")) var numpy = "python3"
    @Option(help: "A plugin file or folder to search first.") var pluginPath: [String] = []

    func run() throws {
        ProcessTuning.configureForParallelModules()
        let registry = try PluginRegistry.discover(explicit: pluginPath)
        let names = strategies.isEmpty ? registry.names.filter { !$0.hasPrefix("template-") } : strategies
        let threads = ProcessInfo.processInfo.activeProcessorCount
        print("lora-agg-bench: \(modules) modules \(dOut)x\(dIn), \(clients) clients, \(threads) threads")
        var rounds: [(String, [Int])] = [("homogeneous r=\(rank)", Array(repeating: rank, count: clients))]
        if !homogeneousOnly {
            let cycle = mixedRanks.split(separator: ",").compactMap { Int($0) }
            rounds.append(("heterogeneous r=\(mixedRanks)", (0..<clients).map { cycle[$0 % cycle.count] }))
        }
        for (title, ranks) in rounds {
            let data = BenchData(modules: modules, dOut: dOut, dIn: dIn, ranks: ranks)
            let gigabytes = Double(data.inputBytes) / 1e9
            print("\n== \(title): \(String(format: "%.2f", gigabytes)) GB of client factors")
            let memcpy = data.timeMemcpy(repeats: repeats)
            print(table([["memcpy", String(format: "%.3f", memcpy), String(format: "%.2f", gigabytes / memcpy), "1.00", "-", "-"]]
                        + (names + variants.filter { $0 != "none" && registry.plugins[String($0.split(separator: ":")[0])] != nil })
                        .map { name in measure(name, registry: registry, data: data, memcpy: memcpy) }))
            if !numpy.isEmpty { printNumpyReference(ranks: ranks) }
        }
        print("\nrate = input bytes / wall time; × memcpy = rate / memcpy rate (≥ 0.5 is the goal for averaging);")
        print("peak = highest resident memory during the strategy's run / input bytes (results streamed, as the CLI writes them).")
    }

    private func measure(_ name: String, registry: PluginRegistry, data: BenchData, memcpy: Double) -> [String] {
        do {
            // "name" or "name:key=value,key=value"
            let parts = name.split(separator: ":", maxSplits: 1).map(String.init)
            let plugin = try registry.plugin(named: parts[0])
            let aggregator = try plugin.makeAggregator(assignments: parts.count > 1 ? parts[1].split(separator: ",").map(String.init) : [])
            let sharedA = plugin.info.capabilities.contains(.requiresSharedA)
            if sharedA { data.prepareSharedA() }
            // Resident memory before the run holds the round (and any shared-A copies);
            // the peak ratio counts the input once plus whatever the strategy adds.
            let baseline = Memory.residentBytes()
            var best = Double.infinity
            Memory.resetPeak()
            for _ in 0..<repeats { best = min(best, try data.run(aggregator, sharedA: sharedA)) }
            let peak = Double(data.inputBytes + max(0, Memory.peakBytes() - baseline)) / Double(data.inputBytes)
            let rate = Double(data.inputBytes) / 1e9 / best
            return [name, String(format: "%.3f", best), String(format: "%.2f", rate),
                    String(format: "%.2f", memcpy / best), String(format: "%.2f", peak),
                    String(format: "%.1f MB", Double(max(0, Memory.peakBytes() - baseline)) / 1e6)]
        } catch {
            let message = (error as? AggregationError)?.message ?? "\(error)"
            return [name, "-", "-", "-", "-", "skipped: \(message.prefix(60))"]
        }
    }

    private func table(_ rows: [[String]]) -> String {
        let all = [["STRATEGY", "SECONDS", "GB/s", "× MEMCPY", "PEAK/INPUT", "EXTRA"]] + rows
        let widths = all[0].indices.map { c in all.map { $0[c].count }.max() ?? 0 }
        return all.map { row in row.enumerated().map { c, cell in cell.padding(toLength: widths[c], withPad: " ", startingAt: 0) }.joined(separator: "  ") }
            .joined(separator: "\n")
    }

    /// Runs scripts/bench_numpy.py (numpy's best routes, algorithms.md §13) on the same shapes.
    private func printNumpyReference(ranks: [Int]) {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../scripts/bench_numpy.py").standardized.path
        guard FileManager.default.fileExists(atPath: script) else { return }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [numpy, script, "--modules", "\(modules)", "--d-out", "\(dOut)", "--d-in", "\(dIn)",
                             "--ranks", ranks.map(String.init).joined(separator: ","), "--repeats", "\(repeats)"]
        let pipe = Pipe()
        process.standardOutput = pipe
        do {
            try process.run()
            let output = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            print("numpy reference (its own process, same shapes):")
            print(String(decoding: output, as: UTF8.self), terminator: "")
        } catch {
            print("numpy reference skipped: \(error)")
        }
    }
}

/// The client factors of one round, one allocation per factor as a file reader would produce.
final class BenchData: @unchecked Sendable {
    let modules: Int, dOut: Int, dIn: Int, ranks: [Int]
    private var a: [[UnsafeMutablePointer<Float>]] = [], b: [[UnsafeMutablePointer<Float>]] = []
    /// Per client, a copy of client 0's A (equal ranks only), for strategies that require a shared A.
    lazy var sharedCopies: [[UnsafeMutablePointer<Float>]] = a.map { clients in
        clients.map { _ in
            let copy = UnsafeMutablePointer<Float>.allocate(capacity: ranks[0] * dIn)
            copy.initialize(from: clients[0], count: ranks[0] * dIn)
            return copy
        }
    }
    let inputBytes: Int

    init(modules: Int, dOut: Int, dIn: Int, ranks: [Int]) {
        self.modules = modules
        self.dOut = dOut
        self.dIn = dIn
        self.ranks = ranks
        inputBytes = modules * ranks.reduce(0) { $0 + $1 * (dOut + dIn) } * 4
        var seed: UInt32 = 0x1234_5678
        func fill(_ count: Int, scale: Float) -> UnsafeMutablePointer<Float> {
            let pointer = UnsafeMutablePointer<Float>.allocate(capacity: count)
            for i in 0..<count {
                seed ^= seed << 13; seed ^= seed >> 17; seed ^= seed << 5
                pointer[i] = (Float(seed >> 8) * (1 / Float(1 << 24)) - 0.5) * scale
            }
            return pointer
        }
        for _ in 0..<modules {
            a.append(ranks.map { fill($0 * dIn, scale: 0.03) })
            b.append(ranks.map { fill(dOut * $0, scale: 0.01) })
        }
    }

    /// Allocates the shared-A copies outside any measurement.
    func prepareSharedA() { if Set(ranks).count == 1 { _ = sharedCopies } }

    /// Best wall time of copying every input byte once.
    func timeMemcpy(repeats: Int) -> Double {
        let target = UnsafeMutableRawPointer.allocate(byteCount: inputBytes, alignment: 64)
        defer { target.deallocate() }
        memset(target, 0, inputBytes)
        var best = Double.infinity
        for _ in 0..<repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            var offset = 0
            for m in 0..<modules {
                for (k, r) in ranks.enumerated() {
                    memcpy(target + offset, a[m][k], r * dIn * 4); offset += r * dIn * 4
                    memcpy(target + offset, b[m][k], dOut * r * 4); offset += dOut * r * 4
                }
            }
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
        }
        return best
    }

    /// Wall time of aggregating every module, spread over the cores; results are dropped as they come.
    /// With `sharedA`, every client sends client 0's A (FFA-LoRA's frozen A), still read from its own pointer.
    func run(_ aggregator: any Aggregator, sharedA: Bool = false) throws -> Double {
        let errors = ErrorBox()
        // Materialised before the parallel loop (a lazy property is not thread-safe);
        // only meaningful when ranks agree, which shared-A strategies require anyway.
        nonisolated(unsafe) let shared = sharedA && Set(ranks).count == 1 ? sharedCopies : a
        let start = DispatchTime.now().uptimeNanoseconds
        DispatchQueue.concurrentPerform(iterations: modules) { m in
            let clients = ranks.enumerated().map { k, r in
                ClientFactors(id: "client-\(k)", samples: Double(100 + 10 * k), scaling: 32 / Double(r),
                              a: MatrixView(rows: r, cols: dIn, base: shared[m][k]), b: MatrixView(rows: dOut, cols: r, base: b[m][k]))
            }
            do {
                _ = try aggregator.aggregate(ModuleRound(module: "layers.\(m).proj", dOut: dOut, dIn: dIn, clients: clients))
            } catch {
                errors.record(error)
            }
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        if let error = errors.first { throw error }
        return seconds
    }

    deinit {
        if Set(ranks).count == 1 { sharedCopies.joined().forEach { $0.deallocate() } }
        a.joined().forEach { $0.deallocate() }
        b.joined().forEach { $0.deallocate() }
    }
}

/// The first error thrown by concurrent work.
final class ErrorBox: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var first: Error?
    func record(_ error: Error) { lock.lock(); if first == nil { first = error }; lock.unlock() }
}

/// Resident memory from /proc, with a resettable high-water mark.
enum Memory {
    static func field(_ name: String) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
            return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
        }
        return 0
    }
    static func residentBytes() -> Int { field("VmRSS") }
    static func peakBytes() -> Int { field("VmHWM") }
    /// Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    static func resetPeak() { try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8) }
}
