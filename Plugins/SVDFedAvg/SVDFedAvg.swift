// svd-fedavg — FedAvg of the products, re-factored by truncated SVD [baseline; McMahan et al., 2017, arXiv:1602.05629].
// Goals, in order: the best rank-R approximation of the exact average (Eckart–Young);
// heterogeneous ranks; then speed (no d_out×d_in matrix, QR of stacked factors).

import LoraAggPluginKit

/// The exact FedAvg of the clients' updates, truncated to a chosen global rank.
///
/// ```
/// p_k = n_k / Σ n_j                          (over the clients present)
/// W   = Σ p_k s_k B_k A_k = U Σ Vᵀ           (thin SVD, LowRank.factoredSVD)
/// R   = rank parameter (0: the largest client rank)
/// A   = V_Rᵀ,  B = U_R Σ_R / s,  scaling s = common scaling
/// ```
///
/// s·B·A is the best rank-R approximation of W. With `exact = true`, R is
/// min(d_out, d_in, Σ r_k), the most W can have, and the product is W itself.
/// The energy kept, Σ_{i≤R} σ_i² / Σ σ_i², and the relative error
/// ‖W − W_R‖/‖W‖ are reported (`energy_kept`, `relative_error`).
///
/// All of σ goes to B and A = V_Rᵀ has orthonormal rows, not √σ on each side:
/// with a split, a zero singular value (an untrained round, or fewer
/// directions than R) would zero both factors of its slot and that slot could
/// never train again. Slots past the rank W can have get B = 0 and a fresh
/// Kaiming-uniform A row, for the same reason. Clients receive the first r_k
/// slots, which are the best rank-r_k approximation of W as well.
struct SVDFedAvg: Strategy {
    static let info = StrategyInfo(
        name: "svd-fedavg",
        version: "1.0.0",
        summary: "Exact average of the products Σ p_k s_k B_k A_k, re-factored to a chosen rank by truncated SVD.",
        citation: "Baseline: FedAvg (McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017, arXiv:1602.05629) of LoRA products with Eckart–Young truncation",
        description: """
            W = Σ p_k s_k B_k A_k with p_k = n_k/Σn, W = UΣVᵀ computed exactly from QR of the stacked \
            factors (never the d_out×d_in matrix); A = V_Rᵀ, B = U_RΣ_R/s at the clients' common scaling \
            s. R is the rank parameter (0: the largest client rank); exact=true keeps every direction W \
            has (min(d_out, d_in, Σr_k)) and is then exact. All of σ goes to B so no slot is ever zero in \
            both factors; slots past W's rank get B = 0 and a fresh Kaiming-uniform A row. Reports \
            energy_kept and relative_error.
            """,
        capabilities: [.heterogeneousRanks],
        parameters: [
            .integer("rank", default: 0, minimum: 0, maximum: 65536,
                     help: "Global rank R of the result; 0 means the largest client rank in the round."),
            .boolean("exact", default: false,
                     help: "Keep every direction the average has, R = min(d_out, d_in, Σ r_k), so nothing is truncated; overrides rank."),
        ])

    let requestedRank: Int
    let keepEverything: Bool

    init(parameters: StrategyParameters) {
        requestedRank = parameters.integer("rank")
        keepEverything = parameters.boolean("exact")
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        let attainable = min(round.dOut, round.dIn, round.ranks.reduce(0, +))
        let rank = keepEverything ? attainable : (requestedRank == 0 ? round.maxRank : requestedRank)
        let svd = try LowRank.factoredSVD(averaging: round, keep: rank)
        let scaling = round.commonScaling
        let factors = svd.loraFactors(rank: rank, scaling: scaling)
        let total = svd.totalEnergy
        return AggregationResult(
            a: factors.a, b: factors.b, scaling: scaling,
            diagnostics: [
                Diagnostic("rank", Double(rank)),
                Diagnostic("energy_kept", total > 0 ? svd.energy(first: rank) / total : 1),
                Diagnostic("relative_error", svd.relativeTruncationError(rank: rank)),
            ])
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(SVDFedAvg.self) }
