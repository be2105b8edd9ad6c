// fedit — FedIT [Zhang et al., 2023], arXiv:2305.05644.
// Goals, in order: the reference behaviour of the baseline; speed (one read of every byte).

import LoraAggPluginKit

/// Plain federated averaging of A and of B, separately.
///
/// ```
/// p_k = n_k / Σ n_j                       (over the clients present)
/// c_k = √(s_k / s),  s = common scaling   (1 when all s_k agree)
/// Ā = Σ p_k c_k A_k,   B̄ = Σ p_k c_k B_k,   effective update s·B̄Ā
/// ```
///
/// Not exact: s·B̄Ā ≠ Σ p_k s_k B_k A_k because of the cross terms p_i p_j B_i A_j.
/// Equal ranks only, like the paper.
/// Deviation: clients with different scalings are rescaled to a common one
/// (the paper's code assumes one α/r for all); see docs/strategies/scaling.md.
struct FedIT: Strategy {
    static let info = StrategyInfo(
        name: "fedit",
        version: "1.0.0",
        summary: "Averages A and B separately by sample count (FedAvg on LoRA factors); fast but biased.",
        citation: "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024, arXiv:2305.05644",
        description: """
            Ā = Σ p_k A_k and B̄ = Σ p_k B_k with p_k = n_k/Σn over the clients present. \
            The product s·B̄Ā misses the cross terms of Σ p_k s_k B_k A_k (the aggregation bias). \
            Clients with different scalings are first rescaled by √(s_k/s) on both factors.
            """,
        capabilities: [])

    init(parameters: StrategyParameters) {}

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        try round.requireEqualRanks(strategy: Self.info.name)
        let weights = round.clients.indices.map { round.weights[$0] * round.factorRescale($0) }
        return AggregationResult(
            a: Kernels.weightedSum(round.clients.map(\.a), weights: weights),
            b: Kernels.weightedSum(round.clients.map(\.b), weights: weights),
            scaling: round.commonScaling)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FedIT.self) }
