// flora — FLoRA [Wang et al., 2024], arXiv:2409.05976.
// Goals, in order: exact (the stacked product is Σ p_k s_k B_k A_k for any ranks and
// scalings); heterogeneous ranks; then speed (one copy of every factor, nothing else).

import LoraAggPluginKit

/// Stacking: the clients' adapters side by side in one adapter of rank Σ r_k.
///
/// ```
/// p_k = n_k / Σ n_j                                   (over the clients present)
/// s   = common scaling (the clients' s when they agree, else Σ p_k s_k)
/// A   = [c_1 A_1; c_2 A_2; …; c_K A_K]   (Σr_k × d_in),   c_k = p_k s_k / s
/// B   = [B_1  B_2  …  B_K]               (d_out × Σr_k)
/// s·B·A = Σ_k s·B_k·c_k A_k = Σ_k p_k s_k B_k A_k      (exact)
/// ```
///
/// The weight p_k and the client's scaling relative to the global one both go
/// into A, as PEFT's `add_weighted_adapter(combination_type="cat")` does; B
/// blocks are the clients' B unchanged. When all s_k agree, c_k = p_k and no
/// extra rounding is added.
///
/// Use: every client merges s·B·A into its base weight and starts a fresh LoRA
/// (A random, B = 0) for the next round, as the official code does (issue #2 of
/// the repository). The global adapter is not sliced per client: its first r_k
/// slots are client 1's block, not an approximation of the update. Its PEFT
/// config must say r = Σ r_k and lora_alpha = s·Σr_k (no rsLoRA), so that PEFT's
/// α/r equals s.
///
/// With `downlink = "residual"` the same exact update is expressed the way
/// clients use it: the stacked product s·B·A is returned as the base-weight
/// residual U·V (U = B, V = s·A, still factored) and the global factors are a
/// fresh LoRA of rank r_max (B = 0, Kaiming-uniform A rows), so that
/// `lora-agg apply-residual` performs the merge and clients train the fresh
/// adapter.
///
/// Bugs of the official code avoided: the global `LoraConfig` uses α = lora_alpha·N
/// and r = lora_r·N, which matches the clients' α = 2r_k only for its default
/// ranks; here the scaling is derived from the clients. Its FedIT baseline
/// accumulates into a misspelled `weighted_sindgle_weights`, so that baseline
/// keeps only p_1 × the first client; use `fedit` here for the real baseline.
struct FLoRA: Strategy {
    static let info = StrategyInfo(
        name: "flora",
        version: "1.0.0",
        summary: "Stacks the clients' adapters into one of rank Σ r_k whose product is exactly Σ p_k s_k B_k A_k.",
        citation: "Wang et al., FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations, NeurIPS 2024, arXiv:2409.05976",
        description: """
            A = [c_1 A_1; …; c_K A_K] and B = [B_1 … B_K] with c_k = p_k s_k/s, p_k = n_k/Σn and s the \
            clients' common scaling (Σ p_k s_k when they differ), so s·B·A = Σ p_k s_k B_k A_k exactly, \
            for any mix of ranks and scalings. The global rank is Σ r_k. Clients merge s·B·A into their \
            base weight and start a fresh LoRA (A random, B = 0) each round, as the official code does; \
            the global adapter is not meant to be sliced per client. Its PEFT config needs r = Σ r_k and \
            lora_alpha = s·Σ r_k. downlink=residual returns the stack as the base residual U·V instead, \
            with a fresh LoRA (B = 0) as the global factors, so apply-residual does the merge. Avoided official-code bugs: a global α/r that matches the clients only \
            for the default ranks, and a FedIT baseline that accumulates into the misspelled \
            weighted_sindgle_weights and so keeps only the first client.
            """,
        capabilities: [.exact, .heterogeneousRanks, .baseResidual],
        parameters: [
            .choice("downlink", default: "stack", choices: ["stack", "residual"],
                    help: "stack: the stacked adapter (rank Σ r_k) as the global factors, as the paper ships it; residual: the stacked product as the base-weight residual and a fresh LoRA (B = 0) as the global factors."),
        ])

    let stackAsResidual: Bool

    init(parameters: StrategyParameters) {
        stackAsResidual = parameters.string("downlink") == "residual"
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        let dOut = round.dOut, dIn = round.dIn
        let stackedRank = round.ranks.reduce(0, +)
        let scaling = round.commonScaling
        let weights = round.weights
        var a = Matrix(zeros: stackedRank, dIn)
        var b = Matrix(zeros: dOut, stackedRank)
        a.values.withUnsafeMutableBufferPointer { aOut in
            b.values.withUnsafeMutableBufferPointer { bOut in
                var slot = 0
                for (k, client) in round.clients.enumerated() {
                    let r = client.rank
                    let factor = client.scaling == scaling ? weights[k] : weights[k] * client.scaling / scaling
                    // A rows are contiguous: one scaled copy of the whole block.
                    Kernels.weightedSum([client.a.base], weights: [Float(factor)], count: r * dIn,
                                        into: aOut.baseAddress! + slot * dIn)
                    // B block: r contiguous columns of every output row.
                    for i in 0..<dOut {
                        (bOut.baseAddress! + i * stackedRank + slot).update(from: client.b.base + i * r, count: r)
                    }
                    slot += r
                }
            }
        }
        let diagnostics = [Diagnostic("global_rank", Double(stackedRank))]
        guard stackAsResidual else {
            return AggregationResult(a: a, b: b, scaling: scaling, diagnostics: diagnostics)
        }
        // The residual carries its scaling: V = s·A.
        if scaling != 1 { a.values.withUnsafeMutableBufferPointer { v in for i in v.indices { v[i] *= Float(scaling) } } }
        let freshRank = round.maxRank
        var freshA = Matrix(zeros: freshRank, dIn)
        for slot in 0..<freshRank {
            freshA.values.replaceSubrange((slot * dIn)..<((slot + 1) * dIn), with: LowRank.initialisationRow(slot: slot, dIn: dIn))
        }
        return AggregationResult(a: freshA, b: Matrix(zeros: dOut, freshRank), scaling: scaling,
                                 residual: FactoredResidual(u: b, v: a), diagnostics: diagnostics)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FLoRA.self) }
