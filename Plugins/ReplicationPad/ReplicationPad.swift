// replication-pad — replication-based padding [Byun and Lee, 2025], arXiv:2406.17477.
// Goals, in order: heterogeneous ranks without diluting high-rank clients; speed (one read of every byte).

import LoraAggPluginKit

/// Averages every rank slot over the clients that own it, weights renormalised.
///
/// ```
/// H_i = { k : r_k > i }                       (owners of slot i, 0-based)
/// c_k = √(s_k / s),  s = common scaling       (rescale to one scaling)
/// Ā[i, :] = Σ_{k∈H_i} n_k c_k A_k[i, :] / Σ_{k∈H_i} n_k
/// B̄[:, i] = Σ_{k∈H_i} n_k c_k B_k[:, i] / Σ_{k∈H_i} n_k
/// client k receives Ā[:r_k, :], B̄[:, :r_k] with scaling s
/// ```
///
/// This is the paper's rule ("fill the missing slots of a low-rank client with
/// the aggregate of the high-rank clients, then average") in closed form: a
/// low-rank client contributes nothing to a slot it lacks, and the owners'
/// weights are renormalised, so a slot owned by few clients is not diluted as
/// in zero-padding. With equal ranks it is FedIT (and zero-pad), bit for bit.
///
/// Caveat (the paper assumes a group of high-rank clients): a lone high-rank
/// client's extra slots enter the global adapter undiluted, at full weight,
/// so the global s·B̄Ā can be far from Σ p_k s_k B_k A_k. The intended use is
/// per client: each client loads its own first r_k slots, which is what it
/// receives (no payload is needed). Not exact, even with equal ranks.
/// Deviations: the paper gives no code; weights are n_k (the paper's FedAvg
/// weights); a slot whose owners all have zero samples is zero; clients with
/// different scalings are rescaled to a common one (docs/strategies/scaling.md).
/// Bugs avoided: replication is not "tile the client's own rows" (a misreading
/// of the paper) and a low-rank client's factors are never renormalised.
struct ReplicationPad: Strategy {
    static let info = StrategyInfo(
        name: "replication-pad",
        version: "1.0.0",
        summary: "Averages each rank slot over the clients owning it, weights renormalised, so high-rank slots are not diluted.",
        citation: "Byun and Lee, Towards Federated Low-Rank Adaptation of Language Models with Rank Heterogeneity, NAACL 2025, arXiv:2406.17477",
        description: """
            Replication padding in closed form: slot i of Ā and B̄ is the sample-weighted mean over the clients \
            with r_k > i only, weights renormalised over those owners (zero-pad would shrink it by their total weight). \
            Client k receives the first r_k slots. With equal ranks this is FedIT, bit for bit. \
            Caveat: the paper assumes a group of high-rank clients; a lone high-rank client's extra slots enter \
            the global adapter undiluted, so the global product can be far from the exact mean of the updates \
            while what each client receives (its first r_k slots) stays good: use the per-client truncations, \
            not the global adapter. A slot whose owners all have zero samples is zero. \
            Clients with different scalings are first rescaled by √(s_k/s) on both factors. Not exact.
            """,
        capabilities: [.heterogeneousRanks])

    init(parameters: StrategyParameters) {}

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        let rank = round.maxRank
        let slotWeights = Self.slotWeights(round, rank: rank)
        // Slots owned by one weighted client while others exist: the lone-high-rank case of the caveat.
        let singleOwnerSlots = round.clients.count < 2 ? 0 : (0..<rank).count(where: { i in
            round.clients.count(where: { $0.rank > i && $0.samples > 0 }) == 1
        })
        return AggregationResult(
            a: Kernels.slotWeightedRowSum(round.clients.map(\.a), slotWeights: slotWeights, rows: rank),
            b: Kernels.slotWeightedColumnSum(round.clients.map(\.b), slotWeights: slotWeights, cols: rank),
            scaling: round.commonScaling,
            diagnostics: [Diagnostic("single_owner_slots", Double(singleOwnerSlots))])
    }

    /// weights[k][i] = n_k c_k / Σ_{j: r_j > i} n_j for i < r_k.
    ///
    /// The owners' total is summed in client order like ``ModuleRound/weights``,
    /// so a slot every client owns gets exactly FedIT's weight.
    static func slotWeights(_ round: ModuleRound, rank: Int) -> [[Double]] {
        let ownerTotals = (0..<rank).map { i in
            round.clients.reduce(0.0) { $0 + ($1.rank > i ? $1.samples : 0) }
        }
        return round.clients.indices.map { k in
            let client = round.clients[k], rescale = round.factorRescale(k)
            return (0..<client.rank).map { i in
                ownerTotals[i] > 0 ? client.samples / ownerTotals[i] * rescale : 0
            }
        }
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(ReplicationPad.self) }
