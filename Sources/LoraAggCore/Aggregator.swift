/// A server-side rule that merges the clients' LoRA factors of one module.
///
/// The key invariant, which the conformance suite checks for every plugin:
/// an aggregator is a pure function of the round (and of its saved state, for
/// stateful strategies). The same round gives bit-identical results, client
/// order does not matter, inputs are never modified, and calls for different
/// modules may run concurrently:
///
/// ```swift
/// let first = try aggregator.aggregate(round)
/// let second = try aggregator.aggregate(round)
/// assert(first == second)
/// ```
///
/// Both built-in Swift strategies and plugins loaded through the C ABI are
/// `Aggregator`s; the host wraps a loaded plugin in one.
public protocol Aggregator: Sendable {
    /// Aggregates one module. Throws ``AggregationError`` on bad input.
    func aggregate(_ round: ModuleRound) throws -> AggregationResult

    /// Serialises the state kept across rounds; `nil` for stateless strategies.
    func saveState() throws -> [UInt8]?

    /// Restores state written by ``saveState()``.
    func loadState(_ bytes: [UInt8]) throws
}

extension Aggregator {
    /// Stateless strategies have nothing to save.
    public func saveState() throws -> [UInt8]? { nil }

    /// Stateless strategies refuse state.
    public func loadState(_ bytes: [UInt8]) throws {
        throw AggregationError.invalidState("this strategy keeps no state across rounds")
    }
}

/// A strategy written in Swift: its description plus a way to build it from
/// hyperparameters. `export(_:)` in LoraAggPluginKit turns one into a plugin.
public protocol Strategy: Aggregator {
    /// Name, version, citation, capabilities and hyperparameters.
    static var info: StrategyInfo { get }

    /// Builds an instance; `parameters` were already checked against `info.parameters`.
    init(parameters: StrategyParameters) throws
}

/// What a strategy can do, as declared in its descriptor.
public struct Capabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Accepts clients of different ranks in one round.
    public static let heterogeneousRanks = Capabilities(rawValue: 1 << 0)
    /// Its effective update equals Σ p_k s_k B_k A_k to round-off.
    public static let exact = Capabilities(rawValue: 1 << 1)
    /// Requires every client to hold the same A.
    public static let requiresSharedA = Capabilities(rawValue: 1 << 2)
    /// May emit a factored residual for the base weight.
    public static let baseResidual = Capabilities(rawValue: 1 << 3)
    /// May emit one payload per client.
    public static let perClientPayloads = Capabilities(rawValue: 1 << 4)
    /// Keeps state across rounds.
    public static let stateful = Capabilities(rawValue: 1 << 5)

    /// Every capability with its user-facing name, in display order.
    public static let named: [(Capabilities, String)] = [
        (.heterogeneousRanks, "heterogeneous-ranks"),
        (.exact, "exact"),
        (.requiresSharedA, "shared-A"),
        (.baseResidual, "base-residual"),
        (.perClientPayloads, "per-client"),
        (.stateful, "stateful"),
    ]

    /// The names of the capabilities present, e.g. `["exact", "base-residual"]`.
    public var names: [String] { Self.named.filter { contains($0.0) }.map(\.1) }
}

/// The self-description every strategy carries across the ABI.
public struct StrategyInfo: Sendable, Equatable {
    /// Kebab-case name used on the command line, e.g. `fedex-lora`.
    public var name: String
    /// Semantic version of the strategy's implementation.
    public var version: String
    /// One sentence, at most 150 characters.
    public var summary: String
    /// Authors, title, venue or arXiv identifier of the paper.
    public var citation: String
    /// Update rule, deviations from the paper and avoided bugs of the official code.
    public var description: String
    /// Declared capabilities.
    public var capabilities: Capabilities
    /// Hyperparameters with types, defaults and ranges.
    public var parameters: [ParameterSpec]

    /// Creates a description.
    public init(name: String, version: String, summary: String, citation: String,
                description: String = "", capabilities: Capabilities = [],
                parameters: [ParameterSpec] = []) {
        self.name = name
        self.version = version
        self.summary = summary
        self.citation = citation
        self.description = description
        self.capabilities = capabilities
        self.parameters = parameters
    }

    /// Problems that make the description unfit for a plugin (empty means fine).
    public var problems: [String] {
        var found: [String] = []
        if !StrategyInfo.isKebabCase(name) { found.append("name '\(name)' is not kebab-case (lowercase letters, digits and single dashes)") }
        if version.split(separator: ".").count != 3 || !version.split(separator: ".").allSatisfy({ Int($0) != nil }) {
            found.append("version '\(version)' is not MAJOR.MINOR.PATCH")
        }
        if summary.isEmpty || summary.count > 150 { found.append("summary must be one sentence of 1 to 150 characters, got \(summary.count)") }
        if summary.contains("\n") { found.append("summary must be one line") }
        if citation.trimmingCharacters(in: .whitespaces).isEmpty { found.append("citation is empty") }
        var seen = Set<String>()
        for parameter in parameters {
            if !seen.insert(parameter.name).inserted { found.append("parameter '\(parameter.name)' is declared twice") }
            found += parameter.problems.map { "parameter '\(parameter.name)': \($0)" }
        }
        return found
    }

    /// Whether `text` is lowercase letters and digits joined by single dashes.
    public static func isKebabCase(_ text: String) -> Bool {
        guard let first = text.first, first.isLetter, first.isLowercase || !first.isLetter else { return false }
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        return parts.allSatisfy { part in
            !part.isEmpty && part.allSatisfy { ($0.isLetter && $0.isLowercase && $0.isASCII) || $0.isNumber }
        }
    }
}

import Foundation
