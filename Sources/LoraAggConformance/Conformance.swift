import Foundation
import LoraAggCore
import LoraAggHost

/// How one check ended.
public enum CheckOutcome: String, Codable, Sendable, CaseIterable {
    /// The plugin met the expectation.
    case pass
    /// The plugin broke the expectation; the detail says how.
    case fail
    /// The check does not apply: the plugin does not declare the capability it tests.
    case skip
    /// The plugin crashed or hung while the check ran (only seen with process isolation).
    case crashed

    /// The label printed by `lora-agg conformance`.
    public var label: String {
        switch self {
        case .pass: return "PASS"
        case .fail: return "FAIL"
        case .skip: return "SKIP"
        case .crashed: return "CRASH"
        }
    }
}

/// The outcome of one check on one plugin, with the number it measured.
public struct CheckResult: Codable, Sendable, Equatable {
    /// The check's kebab-case ID.
    public var id: String
    public var outcome: CheckOutcome
    /// The measured number (a relative error, a count), when the check measures one.
    public var measured: Double?
    /// What `measured` is, e.g. `relative error`.
    public var measure: String?
    /// The bound `measured` was held to, when there is one.
    public var tolerance: Double?
    /// Why it failed, why it was skipped, or the plugin's error message for refusal checks.
    public var detail: String

    public init(id: String, outcome: CheckOutcome, measured: Double? = nil, measure: String? = nil,
                tolerance: Double? = nil, detail: String = "") {
        self.id = id
        self.outcome = outcome
        self.measured = measured
        self.measure = measure
        self.tolerance = tolerance
        self.detail = detail
    }

    /// The measured number as printed, e.g. `relative error 3.2e-08`.
    public var measuredText: String {
        guard let measured else { return "" }
        return "\(measure ?? "measured") \(formatNumber(measured))"
    }
}

/// Formats a measured number compactly: `0`, `0.125`, `3.2e-08`.
public func formatNumber(_ value: Double) -> String {
    if value == 0 { return "0" }
    if !value.isFinite { return "\(value)" }
    if abs(value) >= 1e-3 && abs(value) < 1e5 { return String(format: "%.4g", value) }
    return String(format: "%.2g", value)
}

/// Everything the checks need of a plugin: its metadata and fresh instances.
///
/// Built from a ``LoadedPlugin``; the initializer taking closures lets other
/// kinds of aggregators join the suite.
public struct ConformanceSubject: Sendable {
    /// Name, version, capabilities and hyperparameters.
    public let info: StrategyInfo
    /// The plugin file, for reports.
    public let path: String
    /// A fresh instance with default hyperparameters.
    public let makeAggregator: @Sendable () throws -> any Aggregator
    /// Aggregates on a fresh instance without the host's input validation, so
    /// that bad input reaches the plugin itself.
    public let aggregateUnvalidated: @Sendable (ModuleRound) throws -> AggregationResult

    /// A subject from closures.
    public init(info: StrategyInfo, path: String, makeAggregator: @escaping @Sendable () throws -> any Aggregator,
                aggregateUnvalidated: @escaping @Sendable (ModuleRound) throws -> AggregationResult) {
        self.info = info
        self.path = path
        self.makeAggregator = makeAggregator
        self.aggregateUnvalidated = aggregateUnvalidated
    }

    /// A loaded plugin as a subject: every instance gets default hyperparameters.
    public init(plugin: LoadedPlugin) {
        self.init(info: plugin.info, path: plugin.path,
                  makeAggregator: { try plugin.makeAggregator() },
                  aggregateUnvalidated: { round in try plugin.makeAggregator().aggregateWithoutHostValidation(round) })
    }
}

/// One row of the suite: an ID, the expectation in one sentence, and the test.
public struct ConformanceCheck: Sendable {
    /// Kebab-case ID, stable across releases (used by `--check`).
    public let id: String
    /// The expectation, one sentence.
    public let expectation: String
    let body: @Sendable (CheckContext) throws -> CheckResult
}

/// The report for one plugin.
public struct PluginReport: Codable, Sendable {
    /// The strategy name, or the file name when the plugin did not load.
    public var name: String
    public var version: String
    public var path: String
    public var results: [CheckResult]

    public init(name: String, version: String, path: String, results: [CheckResult]) {
        self.name = name
        self.version = version
        self.path = path
        self.results = results
    }

    /// Whether no check failed or crashed (skips are fine).
    public var passed: Bool { results.allSatisfy { $0.outcome == .pass || $0.outcome == .skip } }

    /// How many checks ended with `outcome`.
    public func count(_ outcome: CheckOutcome) -> Int { results.filter { $0.outcome == outcome }.count }
}

/// The conformance suite: every check, and ways to run them in this process.
///
/// Process isolation (a crashing plugin becomes a `crashed` result) is
/// ``IsolatedRunner``'s job; the functions here run checks directly.
public enum ConformanceSuite {
    /// The ID of the check that loads the plugin and reads its metadata.
    public static let loadCheckID = "load-and-metadata"

    /// Every check, in the order they run.
    public static var checks: [ConformanceCheck] { Checks.all }

    /// The IDs of every check.
    public static var checkIDs: [String] { checks.map(\.id) }

    /// Runs one check, turning an unexpected error into a failure.
    public static func run(_ check: ConformanceCheck, on subject: ConformanceSubject) -> CheckResult {
        let context = CheckContext(subject: subject, id: check.id)
        do {
            return try check.body(context)
        } catch {
            return CheckResult(id: check.id, outcome: .fail, detail: "refused valid input: \(describe(error))")
        }
    }

    /// Runs the checks named in `only` (every check when empty) on a loaded plugin.
    public static func run(on subject: ConformanceSubject, only: [String] = []) -> PluginReport {
        let selected = only.isEmpty ? checks : checks.filter { only.contains($0.id) }
        return PluginReport(name: subject.info.name, version: subject.info.version, path: subject.path,
                            results: selected.map { run($0, on: subject) })
    }

    /// Loads a plugin file and runs the checks; a load failure fails
    /// `load-and-metadata` and skips the rest.
    public static func run(pluginAt path: String, only: [String] = []) -> PluginReport {
        do {
            return run(on: ConformanceSubject(plugin: try PluginLoader.load(path: path)), only: only)
        } catch {
            return loadFailure(path: path, detail: describe(error), only: only)
        }
    }

    /// The report of a plugin that could not be loaded: `load-and-metadata`
    /// gets `outcome`, every other selected check is skipped.
    public static func loadFailure(path: String, detail: String, outcome: CheckOutcome = .fail, only: [String] = []) -> PluginReport {
        let ids = only.isEmpty ? checkIDs : checkIDs.filter { only.contains($0) }
        let results = ids.map { id in
            id == loadCheckID
                ? CheckResult(id: id, outcome: outcome, detail: detail)
                : CheckResult(id: id, outcome: .skip, detail: "the plugin did not load")
        }
        return PluginReport(name: (path as NSString).lastPathComponent, version: "?", path: path, results: results)
    }

    /// An error as one line: the category and the message.
    static func describe(_ error: Error) -> String {
        if let error = error as? AggregationError { return "\(category(error)): \(error.message)" }
        return "\(error)".split(separator: "\n").joined(separator: " / ")
    }

    static func category(_ error: AggregationError) -> String {
        switch error {
        case .invalidInput: return "invalid input"
        case .unsupported: return "unsupported"
        case .invalidConfig: return "invalid config"
        case .invalidState: return "invalid state"
        case .internalError: return "internal error"
        }
    }
}
