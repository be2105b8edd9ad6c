// fedsa-lora — FedSA-LoRA [Guo et al., 2025], arXiv:2410.01463.
// Goals, in order: each client keeps its own B (the official code shares one by
// accident); A averaged untouched; then speed (one weighted sum, copies of B).

import LoraAggPluginKit

/// Share A, personalise B: only the A factors are averaged.
///
/// ```
/// p_k = n_k / Σ n_j                       (over the clients present)
/// Ā   = Σ p_k A_k                          (A is not rescaled: it is what is shared)
/// client k:  A = Ā,  B = B_k (its own),  scaling s_k (its own)
/// global:    A = Ā,  B̄ = Σ p_k (s_k/s) B_k,  scaling s = common scaling
/// ```
///
/// The per-client payloads are the strategy: client k continues with the shared
/// Ā and exactly the B_k and s_k it sent, so nothing about its personal factor
/// changes. The global B̄ is reported only so the result is a complete adapter
/// (s·B̄Ā = Σ p_k s_k B_k Ā, the mean of the clients' next-round updates); it is
/// not meant for clients. Because A must stay untouched, the scaling ratio
/// s_k/s of the scaling convention goes entirely into B̄.
///
/// Bug of the official code avoided: its configurations set
/// `federate.share_local_model: True` with `online_aggr: False`, so every client
/// trains the one server model object and the "local" B is a single B handed
/// from client to client. Here B_k is returned to client k, bit for bit.
/// Equal ranks only, like the paper (Ā needs one shape).
struct FedSALoRA: Strategy {
    static let info = StrategyInfo(
        name: "fedsa-lora",
        version: "1.0.0",
        summary: "Averages only A (shared knowledge); each client gets Ā back with its own B and scaling (personalised).",
        citation: "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025, arXiv:2410.01463",
        description: """
            Ā = Σ p_k A_k with p_k = n_k/Σn; client k receives A = Ā with its own B_k and scaling s_k \
            (per-client payloads). The global B̄ = Σ p_k (s_k/s) B_k at the common scaling s is reported \
            for completeness and is not meant for clients. Avoids the official code's shared-B bug \
            (share_local_model: True makes all clients train one B). Equal ranks only.
            """,
        capabilities: [.perClientPayloads])

    init(parameters: StrategyParameters) {}

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        try round.requireEqualRanks(strategy: Self.info.name)
        let weights = round.weights
        let scaling = round.commonScaling
        let sharedA = Kernels.weightedSum(round.clients.map(\.a), weights: weights)
        let meanB = Kernels.weightedSum(round.clients.map(\.b), weights: round.clients.indices.map { k in
            round.clients[k].scaling == scaling ? weights[k] : weights[k] * round.clients[k].scaling / scaling
        })
        let payloads = round.clients.map { client in
            ClientPayload(a: sharedA, b: client.b.copy(), scaling: client.scaling)
        }
        return AggregationResult(a: sharedA, b: meanB, scaling: scaling, clientPayloads: payloads)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FedSALoRA.self) }
