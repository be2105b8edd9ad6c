// zero-pad — HetLoRA zero-padding aggregation [Cho et al., 2024], arXiv:2401.06432.
// Goals, in order: heterogeneous ranks; HetLoRA's norm weights without a d_out×d_in product;
// speed (one read of every byte with sample weights).

import LoraAggPluginKit

/// Zero-pads every client to the largest rank R and averages the padded factors.
///
/// ```
/// c_k = √(s_k / s),  s = common scaling              (rescale to one scaling)
/// weighting=samples:  w_k = n_k / Σ n_j
/// weighting=norm:     w_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F      (HetLoRA)
///                     ‖B A‖²_F = tr((BᵀB)(AAᵀ)), two r×r Grams, no d_out×d_in product
/// Ā[i, :] = Σ_{k: r_k > i} w_k c_k A_k[i, :]          (R×d_in)
/// B̄[:, i] = Σ_{k: r_k > i} w_k c_k B_k[:, i]          (d_out×R)
/// client k receives Ā[:r_k, :], B̄[:, :r_k] with scaling s
/// ```
///
/// Not exact (the cross terms of FedIT, plus slot i > r_k shrinks by the
/// weight of the clients that own it). With equal ranks and sample weights it
/// is FedIT, bit for bit.
///
/// Decision: the norm includes s_k, because s_k B_k A_k is the update the
/// client actually applied; when all clients share one scaling it cancels and
/// the weights are exactly HetLoRA's ‖B_k A_k‖_F / Σ‖B_j A_j‖_F.
/// Deviations: clients with zero samples get weight 0 in both modes (they
/// did not train); if every weighted client's update is zero (round 0 with
/// B = 0), norm weighting falls back to sample weights. Different scalings are
/// rescaled to a common one (docs/strategies/scaling.md); HetLoRA assumes one.
/// Bugs avoided: the FlexLoRA branch's HetLoRA baseline pads to a hard-coded
/// rank 360 and uses n_k instead of norm weights; here R is the round's
/// largest rank and both weightings are offered.
struct ZeroPad: Strategy {
    static let info = StrategyInfo(
        name: "zero-pad",
        version: "1.0.0",
        summary: "Zero-pads clients to the largest rank and averages A and B (HetLoRA); sample or norm weights.",
        citation: "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, EMNLP 2024, arXiv:2401.06432",
        description: """
            Every client is padded with zeros to the largest rank R: Ā[i,:] = Σ_{k: r_k > i} w_k A_k[i,:] and \
            B̄[:,i] = Σ_{k: r_k > i} w_k B_k[:,i]; client k receives the first r_k slots. \
            weighting=samples (default) uses w_k = n_k/Σn; weighting=norm uses HetLoRA's \
            w_k ∝ ‖s_k B_k A_k‖_F, computed from r×r Gram matrices without forming B_k A_k \
            (s_k cancels when the clients share one scaling). Clients with zero samples get weight 0; \
            if every update is zero, norm weighting falls back to sample weights. \
            Clients with different scalings are first rescaled by √(s_k/s) on both factors. \
            Not exact: a slot owned by few clients is shrunk by their total weight.
            """,
        capabilities: [.heterogeneousRanks],
        parameters: [
            .choice("weighting", default: "samples", choices: ["samples", "norm"],
                    help: "Client weights: 'samples' (n_k/Σn) or 'norm' (HetLoRA, ∝ ‖s_k B_k A_k‖_F)"),
        ])

    /// Whether to weight by the Frobenius norm of each client's update.
    let normWeighting: Bool

    init(parameters: StrategyParameters) {
        normWeighting = parameters.string("weighting") == "norm"
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        var weights = round.weights
        var diagnostics: [Diagnostic] = []
        if normWeighting {
            let (norm, fellBack) = Self.normWeights(round)
            weights = norm
            // Reported so a user can see HetLoRA's weights per client (round order).
            diagnostics = weights.enumerated().map { Diagnostic("weight_\($0.offset)", $0.element) }
            diagnostics.append(Diagnostic("norm_fallback", fellBack ? 1 : 0))
        }
        let factors = round.clients.indices.map { weights[$0] * round.factorRescale($0) }
        let rank = round.maxRank
        // The same sums as Kernels.paddedRowSum / paddedColumnSum (bit for bit),
        // from the kernels that skip the zero fill and keep B's sums in registers.
        let slotWeights = factors.map { [Double](repeating: $0, count: rank) }
        return AggregationResult(
            a: Kernels.slotWeightedRowSum(round.clients.map(\.a), slotWeights: slotWeights, rows: rank),
            b: Kernels.slotWeightedColumnSum(round.clients.map(\.b), slotWeights: slotWeights, cols: rank),
            scaling: round.commonScaling,
            diagnostics: diagnostics)
    }

    /// HetLoRA's weights ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F over the clients
    /// with samples; sample weights (and `true`) when all those updates are zero.
    static func normWeights(_ round: ModuleRound) -> (weights: [Double], fellBack: Bool) {
        let norms = round.clients.map { client in
            client.samples > 0 ? client.scaling * Kernels.productFrobeniusNorm(b: client.b, a: client.a) : 0
        }
        let total = norms.reduce(0, +)
        guard total > 0, total.isFinite else { return (round.weights, true) }
        return (norms.map { $0 / total }, false)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(ZeroPad.self) }
