// flexlora — FlexLoRA [Bai et al., 2024], arXiv:2402.11505.
// Goals, in order: the exact SVD of the aggregated update (never the d_out×d_in matrix);
// heterogeneous ranks; then speed (QR of the stacked factors, a small core SVD).

import LoraAggPluginKit

/// FedAvg of the clients' products, re-factored by SVD and truncated to each client's rank.
///
/// ```
/// p_k = n_k / Σ n_j                          (over the clients present)
/// W   = Σ p_k s_k B_k A_k = U Σ Vᵀ           (thin SVD, LowRank.factoredSVD)
/// client k:  A = V_{r_k}ᵀ,  B = U_{r_k} Σ_{r_k} / s_k,  scaling s_k
/// global:    A = V_{r_max}ᵀ, B = U_{r_max} Σ_{r_max} / s,  scaling s = common scaling
/// ```
///
/// All singular values go to B, as in the official code, so s_k·B·A = U_r Σ_r V_rᵀ:
/// the best rank-r_k approximation of W (Eckart–Young). Not exact: client k
/// loses ‖W − W_{r_k}‖_F, reported relative to ‖W‖_F as `truncation_error_<k>`
/// (k = the client's position in the round).
///
/// Deviations: W is never formed. The paper's code calls `torch.svd` on the
/// dense d_out×d_in sum; here the SVD comes from QR of the stacked factors and
/// the SVD of a (Σ r_k)² core, which is the same decomposition (docs/lowrank.md).
/// The official code hard-codes α = 16 (s_k = 16/r_k); here each client's own
/// scaling is used, so rsLoRA clients work too.
///
/// Ranks above what W can have: a client of rank r_k > min(d_out, d_in, Σ r_j)
/// (e.g. r = 16 on a 10-class head) would get slots that are zero in both
/// factors, which training can never revive. Those slots get B = 0 and a fresh
/// Kaiming-uniform A row (PEFT's own init), so the update is unchanged and the
/// slot can still learn.
struct FlexLoRA: Strategy {
    static let info = StrategyInfo(
        name: "flexlora",
        version: "1.0.0",
        summary: "SVD of the averaged product Σ p_k s_k B_k A_k, truncated to each client's own rank; heterogeneous ranks.",
        citation: "Bai et al., Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources, NeurIPS 2024, arXiv:2402.11505",
        description: """
            W = Σ p_k s_k B_k A_k with p_k = n_k/Σn; W = UΣVᵀ; client k receives A = V_{r_k}ᵀ and \
            B = U_{r_k}Σ_{r_k}/s_k with its own scaling s_k (per-client payloads); the global factors are \
            the top r_max triplets with B divided by the common scaling. The SVD is exact and computed \
            from QR of the stacked factors, never from the d_out×d_in matrix. Each client's relative \
            truncation error ‖W − W_{r_k}‖/‖W‖ is reported as truncation_error_<k>. Slots beyond the \
            rank W can have (r_k > min(d_out, d_in, Σr)) get B = 0 and a fresh Kaiming-uniform A row \
            so they remain trainable. Deviation: the official code fixes α = 16; here each client's \
            own scaling is used.
            """,
        capabilities: [.heterogeneousRanks, .perClientPayloads])

    init(parameters: StrategyParameters) {}

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        let maxRank = round.maxRank
        let svd = try LowRank.factoredSVD(averaging: round, keep: maxRank)

        let scaling = round.commonScaling
        let global = svd.loraFactors(rank: maxRank, scaling: scaling)
        let payloads = round.clients.map { client in
            let factors = svd.loraFactors(rank: client.rank, scaling: client.scaling)
            return ClientPayload(a: factors.a, b: factors.b, scaling: client.scaling)
        }
        var diagnostics = round.clients.indices.map { k in
            Diagnostic("truncation_error_\(k)", svd.relativeTruncationError(rank: round.clients[k].rank))
        }
        diagnostics.append(Diagnostic("truncation_error_max",
                                      round.ranks.map { svd.relativeTruncationError(rank: $0) }.max() ?? 0))
        diagnostics.append(Diagnostic("truncation_error_global", svd.relativeTruncationError(rank: maxRank)))
        return AggregationResult(a: global.a, b: global.b, scaling: scaling,
                                 clientPayloads: payloads, diagnostics: diagnostics)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FlexLoRA.self) }
