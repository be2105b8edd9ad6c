import Foundation
import LoraAggCore
import LoraAggHost

/// One line of the file a child process writes: a JSON object with a
/// `version` and a `kind`. Readers ignore kinds they do not know.
struct ChildRecord: Codable {
    static let currentVersion = 1
    /// A measured error can be infinite (a result with payloads against one
    /// without); JSON has no infinity, so it travels as a string.
    static let nonFinite = JSONEncoder.NonConformingFloatEncodingStrategy.convertToString(
        positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
    static let nonFiniteDecoding = JSONDecoder.NonConformingFloatDecodingStrategy.convertFromString(
        positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")

    var version = ChildRecord.currentVersion
    /// `plugin` (loaded: name, pluginVersion, path), `load-failed` (detail),
    /// `started` (check), or `result` (result).
    var kind: String
    var check: String?
    var result: CheckResult?
    var name: String?
    var pluginVersion: String?
    var path: String?
    var detail: String?
}

/// The child side of process isolation: loads one plugin, runs checks, and
/// appends a record per event to a file, so that whatever the child wrote
/// before a crash survives it.
public enum ConformanceChild {
    /// Runs `checks` (every check when empty) on the plugin at `pluginPath`,
    /// writing records to `output`. Returns normally even when checks fail;
    /// only a crash of the plugin ends the process early.
    public static func run(pluginPath: String, checks: [String], output: String) throws {
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        guard let file = FileHandle(forWritingAtPath: output) else {
            throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: output])
        }
        defer { try? file.close() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = ChildRecord.nonFinite
        func write(_ record: ChildRecord) {
            // One unbuffered write per record: the bytes reach the kernel
            // before the next check can crash the process.
            guard var data = try? encoder.encode(record) else { return }
            data.append(UInt8(ascii: "\n"))
            file.write(data)
        }
        write(ChildRecord(kind: "started", check: ConformanceSuite.loadCheckID))
        let plugin: LoadedPlugin
        do {
            plugin = try PluginLoader.load(path: pluginPath)
        } catch {
            write(ChildRecord(kind: "load-failed", detail: ConformanceSuite.describe(error)))
            return
        }
        write(ChildRecord(kind: "plugin", name: plugin.info.name, pluginVersion: plugin.info.version, path: pluginPath))
        let subject = ConformanceSubject(plugin: plugin)
        let selected = checks.isEmpty ? ConformanceSuite.checks : ConformanceSuite.checks.filter { checks.contains($0.id) }
        for check in selected {
            write(ChildRecord(kind: "started", check: check.id))
            write(ChildRecord(kind: "result", check: check.id, result: ConformanceSuite.run(check, on: subject)))
        }
    }
}

/// Runs the suite on a plugin file in child processes, so that a plugin that
/// crashes or hangs in one check yields a `crashed` result for that check and
/// the remaining checks still run (in a fresh child).
///
/// The child is `executable conformance --child FILE --check ID ... PATH`:
/// `lora-agg` re-executing itself (see ``childArguments(pluginPath:checks:output:)``).
public struct IsolatedRunner: Sendable {
    /// The `lora-agg` executable to start as the child.
    public var executable: String
    /// Seconds one check may run before the child is killed and the check counts as crashed.
    public var timeout: Double

    /// A runner that starts `executable` (by default this process's own executable).
    public init(executable: String? = nil, timeout: Double = 120) {
        self.executable = executable
            ?? (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? CommandLine.arguments[0]
        self.timeout = timeout
    }

    /// The child's command line (after the executable).
    public static func childArguments(pluginPath: String, checks: [String], output: String) -> [String] {
        ["conformance", "--child", output] + checks.flatMap { ["--check", $0] } + [pluginPath]
    }

    /// Runs the checks in `only` (every check when empty) on the plugin file.
    public func run(pluginPath: String, only: [String] = []) -> PluginReport {
        var remaining = only.isEmpty ? ConformanceSuite.checkIDs : ConformanceSuite.checkIDs.filter { only.contains($0) }
        var results: [String: CheckResult] = [:]
        var name: String?
        var version = "?"
        var firstChild = true
        while !remaining.isEmpty {
            let run = runChild(pluginPath: pluginPath, checks: firstChild ? remaining : remaining.filter { $0 != ConformanceSuite.loadCheckID })
            firstChild = false
            if let loaded = run.records.first(where: { $0.kind == "plugin" }) {
                name = loaded.name
                version = loaded.pluginVersion ?? "?"
            }
            if let failed = run.records.first(where: { $0.kind == "load-failed" }) {
                return ConformanceSuite.loadFailure(path: pluginPath, detail: failed.detail ?? "could not load", only: only)
            }
            var started: String?
            for record in run.records {
                switch record.kind {
                case "started": started = record.check
                case "result":
                    if let result = record.result { results[result.id] = result }
                    started = nil
                default: break
                }
            }
            remaining.removeAll { results[$0] != nil }
            guard let crash = run.crash else {
                // A clean exit that skipped checks would loop forever: count them as crashed.
                for id in remaining { results[id] = CheckResult(id: id, outcome: .crashed, detail: "the child exited without a result") }
                remaining = []
                break
            }
            if name == nil {
                // The plugin crashed while loading: nothing else can run.
                return ConformanceSuite.loadFailure(path: pluginPath, detail: "crashed while loading: \(crash)", outcome: .crashed, only: only)
            }
            let culprit = started ?? remaining.first!
            results[culprit] = CheckResult(id: culprit, outcome: .crashed, detail: crash)
            remaining.removeAll { $0 == culprit }
        }
        let ids = only.isEmpty ? ConformanceSuite.checkIDs : ConformanceSuite.checkIDs.filter { only.contains($0) }
        return PluginReport(name: name ?? (pluginPath as NSString).lastPathComponent, version: version, path: pluginPath,
                            results: ids.compactMap { results[$0] })
    }

    /// One child: its records, and a description of how it crashed (nil when it exited cleanly).
    private func runChild(pluginPath: String, checks: [String]) -> (records: [ChildRecord], crash: String?) {
        let folder = FileManager.default.temporaryDirectory
            .appendingPathComponent("lora-agg-conformance-\(ProcessInfo.processInfo.processIdentifier)-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let output = folder.appendingPathComponent("records.jsonl").path
        let errors = folder.appendingPathComponent("stderr.txt").path
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        _ = FileManager.default.createFile(atPath: errors, contents: nil)

        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = Self.childArguments(pluginPath: pluginPath, checks: checks, output: output)
        var environment = ProcessInfo.processInfo.environment
        // Swift's backtracer can spend seconds symbolicating a crash we only count.
        environment["SWIFT_BACKTRACE"] = "enable=no"
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle(forWritingAtPath: errors)
        process.standardInput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            return ([], "could not start '\(executable)': \(error)")
        }
        // The deadline restarts whenever the child reports progress.
        var deadline = Date().addingTimeInterval(timeout)
        var lastSize: UInt64 = 0
        var timedOut = false
        while process.isRunning {
            Thread.sleep(forTimeInterval: 0.01)
            let size = (try? FileManager.default.attributesOfItem(atPath: output)[.size] as? UInt64) ?? 0
            if size != lastSize {
                lastSize = size
                deadline = Date().addingTimeInterval(timeout)
            } else if Date() > deadline {
                timedOut = true
                process.terminate()
                kill(process.processIdentifier, SIGKILL)
                break
            }
        }
        process.waitUntilExit()
        let records = Self.readRecords(output)
        let tail = Self.crashMessage(errors).map { "; it printed: \($0)" } ?? ""
        if timedOut {
            return (records, "no progress for \(formatNumber(timeout)) s: the check hung and was killed")
        }
        switch process.terminationReason {
        case .uncaughtSignal:
            return (records, "the plugin crashed: signal \(process.terminationStatus) (\(Self.signalName(process.terminationStatus)))\(tail)")
        case .exit where process.terminationStatus != 0:
            return (records, "the child exited with status \(process.terminationStatus)\(tail)")
        default:
            return (records, nil)
        }
    }

    /// The most telling line a crashed child wrote to standard error: a
    /// Swift "Fatal error" or assertion line when there is one (the stack
    /// trace that follows it says less), else the last line that is not a
    /// stack frame.
    static func crashMessage(_ path: String) -> String? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        let lines = text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let isFrame = { (line: String) in line.first?.isNumber == true || line.hasPrefix("Current stack trace") || line.hasPrefix("Stack dump") }
        let line = lines.first { $0.contains("Fatal error") || $0.contains("Assertion") || $0.contains("Precondition failed") }
            ?? lines.last { !isFrame($0) }
        return line.map { String($0.prefix(300)) }
    }

    static func readRecords(_ path: String) -> [ChildRecord] {
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = ChildRecord.nonFiniteDecoding
        return data.split(separator: UInt8(ascii: "\n")).compactMap { line in
            // A line cut short by a crash does not parse and is ignored.
            guard let record = try? decoder.decode(ChildRecord.self, from: Data(line)),
                  record.version == ChildRecord.currentVersion else { return nil }
            return record
        }
    }

    static func signalName(_ signal: Int32) -> String {
        switch signal {
        case SIGSEGV: return "SIGSEGV"
        case SIGABRT: return "SIGABRT"
        case SIGILL: return "SIGILL"
        case SIGTRAP: return "SIGTRAP"
        case SIGFPE: return "SIGFPE"
        case SIGBUS: return "SIGBUS"
        case SIGKILL: return "SIGKILL"
        case SIGTERM: return "SIGTERM"
        default: return "signal \(signal)"
        }
    }
}
