import Foundation
import LoraAggHost

/// Runs the built `lora-agg` executable for the conformance and new-plugin tests.
enum ConformanceTools {
    /// The CLI next to the test bundle (`swift test` builds every product).
    static var executable: String { TestSupport.buildFolder + "/lora-agg" }

    /// The checkout this test file belongs to.
    static let checkout = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// What a finished process printed and how it exited.
    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    /// Runs `executable` with `arguments`, capturing both streams through files
    /// (pipes could fill up and block a chatty child).
    static func run(_ executable: String, _ arguments: [String], in folder: String? = nil,
                    environment: [String: String] = [:]) throws -> Output {
        let scratch = NSTemporaryDirectory() + "lora-agg-run-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let out = scratch + "/stdout", err = scratch + "/stderr"
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        _ = FileManager.default.createFile(atPath: err, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let folder { process.currentDirectoryURL = URL(fileURLWithPath: folder) }
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        process.standardOutput = FileHandle(forWritingAtPath: out)
        process.standardError = FileHandle(forWritingAtPath: err)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        return Output(status: process.terminationStatus,
                      stdout: (try? String(contentsOfFile: out, encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: err, encoding: .utf8)) ?? "")
    }

    /// Runs `lora-agg`.
    static func loraAgg(_ arguments: [String], in folder: String? = nil) throws -> Output {
        try run(executable, arguments, in: folder)
    }

    /// The `--json` report, decoded: plugin name → check ID → (outcome, detail).
    static func decodeReport(_ json: String) throws -> [String: [String: (outcome: String, detail: String)]] {
        guard let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any],
              let plugins = object["plugins"] as? [[String: Any]] else {
            throw CocoaError(.coderReadCorrupt)
        }
        var report: [String: [String: (outcome: String, detail: String)]] = [:]
        for plugin in plugins {
            let name = plugin["name"] as? String ?? "?"
            var checks: [String: (outcome: String, detail: String)] = [:]
            for result in plugin["results"] as? [[String: Any]] ?? [] {
                checks[result["id"] as? String ?? "?"] = (result["outcome"] as? String ?? "?", result["detail"] as? String ?? "")
            }
            report[name] = checks
        }
        return report
    }
}
