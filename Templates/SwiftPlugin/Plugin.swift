// template-swift — a starting point for a lora-agg strategy written in Swift.
// `lora-agg new-plugin NAME` copies this folder and renames the strategy.
// Goals, in order: correct math on every input the conformance suite sends; then speed.

import LoraAggPluginKit

/// Federated averaging of A and B with a server learning rate.
///
/// ```
/// p_k = n_k / Σ n_j,   c_k = √(s_k / s)        (s: the clients' common scaling)
/// Ā = Σ p_k c_k A_k,   B̄ = η · Σ p_k c_k B_k   (η: server_lr)
/// ```
///
/// Replace the body of `aggregate` with your rule. The plugin kit has already
/// checked the round (shapes, samples, scalings) before calling it, and checks
/// the result (shapes, NaN) after, so only the math is left to you.
struct TemplateSwift: Strategy {
    // Everything `lora-agg list` and `describe` show, and the conformance suite checks.
    static let info = StrategyInfo(
        name: "template-swift",
        version: "0.1.0",
        summary: "Averages A and B by sample count, then scales the update by a server learning rate.",
        citation: "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017",
        description: "A template: FedIT-style factor averaging with a server learning rate on B.",
        // Declare only what is true: the conformance suite holds you to it.
        capabilities: [],
        parameters: [
            .number("server_lr", default: 1, minimum: 0, maximum: 10,
                    help: "Server learning rate η multiplying the averaged B (1 = plain averaging)."),
        ])

    let serverLearningRate: Double

    // `parameters` were checked against `info.parameters` (type, range, unknown keys).
    init(parameters: StrategyParameters) throws {
        serverLearningRate = parameters.number("server_lr")
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        // Refuse what you do not handle with a message naming the module and ranks.
        try round.requireEqualRanks(strategy: Self.info.name)
        let weights = round.clients.indices.map { round.weights[$0] * round.factorRescale($0) }
        return AggregationResult(
            a: Kernels.weightedSum(round.clients.map(\.a), weights: weights),
            b: Kernels.weightedSum(round.clients.map(\.b), weights: weights.map { $0 * serverLearningRate }),
            scaling: round.commonScaling,
            diagnostics: [Diagnostic("server_lr", serverLearningRate)])
    }
}

// The one export line: a public C entry point returning the descriptor.
@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(TemplateSwift.self) }
