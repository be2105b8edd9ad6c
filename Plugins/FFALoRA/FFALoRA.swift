// ffa-lora — FFA-LoRA, federated freeze-A LoRA [Sun et al., 2024], arXiv:2403.12313.
// Goals, in order: exact (shared frozen A); refuse clients whose A differs; speed (one read of every byte).

import LoraAggPluginKit

/// A is shared and frozen; only B is averaged, which makes the product exact.
///
/// ```
/// require A_k = A_0 for every k (within tolerance, see below); equal ranks
/// s = common scaling
/// B̄ = Σ p_k (s_k / s) B_k,   Ā = A_0,   scaling s
/// s·B̄·A_0 = Σ p_k s_k B_k A_0 = Σ p_k s_k B_k A_k     (exact)
/// ```
///
/// Shared A is checked, not assumed: client k is refused when
/// max |A_k − A_0| > tolerance · max |A_0| (default 1e-6, about eight Float
/// ulps of the largest entry), naming the module and the client, because with
/// different A the rule silently stops being exact. A_0 is the first client's
/// A in round order; within the tolerance the choice is immaterial.
/// Scalings: A must stay shared, so the whole s_k/s is folded into B
/// (docs/strategies/scaling.md); the paper's setting has one α, where the
/// factor is 1 and the rule is the paper's.
/// Deviations: weights are n_k/Σn (FedAvg) where the reference copies use 1/K.
/// Bugs avoided: fedex-lora's `create_peft_gpt2_model_e2e_ffa` freezes A
/// before `get_peft_model`, so A trains and only B is averaged (not FFA-LoRA,
/// and not exact); here differing A is an error, never silently averaged.
struct FFALoRA: Strategy {
    static let info = StrategyInfo(
        name: "ffa-lora",
        version: "1.0.0",
        summary: "Keeps the shared frozen A and averages only B (FFA-LoRA); exact, refuses clients whose A differs.",
        citation: "Sun, Li, Li, Ding, Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024, arXiv:2403.12313",
        description: """
            A is initialised once, shared by every client and frozen; only B is trained and averaged: \
            B̄ = Σ p_k (s_k/s) B_k with p_k = n_k/Σn, Ā = A_0, so s·B̄·A_0 = Σ p_k s_k B_k A_k exactly. \
            Clients with different scalings have the whole s_k/s folded into B, because A must stay shared. \
            A client whose A differs from the first client's by more than tolerance·max|A_0| \
            (tolerance 1e-6 by default) is refused with an error naming it; equal ranks are required. \
            The reference copies average with 1/K; this uses sample weights (1/K when samples are equal).
            """,
        capabilities: [.exact, .requiresSharedA],
        parameters: [
            .number("tolerance", default: 1e-6, minimum: 0, maximum: 1,
                    help: "Largest allowed max|A_k − A_0| relative to max|A_0| before a client's A counts as different"),
        ])

    /// Relative tolerance of the shared-A check.
    let tolerance: Double

    init(parameters: StrategyParameters) {
        tolerance = parameters.number("tolerance")
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        try round.requireEqualRanks(strategy: Self.info.name)
        try requireSharedA(round)
        let s = round.commonScaling
        let weights = round.clients.indices.map { k in
            round.weights[k] * (round.clients[k].scaling == s ? 1 : round.clients[k].scaling / s)
        }
        return AggregationResult(
            a: round.clients[0].a.copy(),
            b: Kernels.weightedSum(round.clients.map(\.b), weights: weights),
            scaling: s)
    }

    /// Throws unless every client's A equals the first one's within the tolerance.
    func requireSharedA(_ round: ModuleRound) throws {
        let reference = round.clients[0]
        let count = reference.a.count
        let largest = Kernels.maxMagnitude(reference.a.base, count: count)
        if !largest.isFinite { throw Self.nonFinite(round, reference) }
        let allowed = Float(tolerance * Double(largest))
        for client in round.clients.dropFirst()
        where !Kernels.allWithin(client.a.base, reference.a.base, count: count, tolerance: allowed) {
            if !client.a.isFinite { throw Self.nonFinite(round, client) }
            var worst: Float = 0
            for i in 0..<count { worst = Swift.max(worst, abs(client.a.base[i] - reference.a.base[i])) }
            throw AggregationError.invalidInput(
                "module '\(round.module)', client '\(client.id)': A differs from client '\(reference.id)' by up to \(worst) (allowed \(allowed), tolerance \(tolerance) of max|A_0|); ffa-lora needs one shared, frozen A on every client")
        }
    }

    /// The plugin kit's wording for a non-finite factor.
    static func nonFinite(_ round: ModuleRound, _ client: ClientFactors) -> AggregationError {
        .invalidInput("module '\(round.module)', client '\(client.id)': A contains NaN or infinite values")
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FFALoRA.self) }
