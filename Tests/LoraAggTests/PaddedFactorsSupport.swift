import LoraAggCore
import LoraAggHost

/// Helpers shared by the zero-pad, replication-pad and ffa-lora suites:
/// running a plugin on owned clients, and independent Double references.
enum PaddedFactors {
    /// Float results against Double references of O(1) values: a few Float ulps.
    static let tolerance = 1e-5

    /// Runs the named plugin on one module.
    static func aggregate(_ strategy: String, _ clients: [ClientUpdate], dOut: Int, dIn: Int,
                          module: String = "model.layers.0.self_attn.q_proj",
                          parameters: [String] = []) throws -> AggregationResult {
        let aggregator = try TestSupport.registry.plugin(named: strategy).makeAggregator(assignments: parameters)
        return try ModuleRound.withRound(module: module, dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    /// The padded weighted sums computed entry by entry in Double:
    /// A[i, j] = Σ_{k: r_k > i} weight(k, i) A_k[i, j] and B[i, t] = Σ_{k: r_k > t} weight(k, t) B_k[i, t].
    static func paddedSums(_ clients: [ClientUpdate], rank: Int, dOut: Int, dIn: Int,
                           weight: (Int, Int) -> Double) -> (a: [[Double]], b: [[Double]]) {
        var a = [[Double]](repeating: [Double](repeating: 0, count: dIn), count: rank)
        var b = [[Double]](repeating: [Double](repeating: 0, count: rank), count: dOut)
        for (k, client) in clients.enumerated() {
            for slot in 0..<client.rank {
                let w = weight(k, slot)
                for j in 0..<dIn { a[slot][j] += w * Double(client.a[slot, j]) }
                for i in 0..<dOut { b[i][slot] += w * Double(client.b[i, slot]) }
            }
        }
        return (a, b)
    }

    /// The largest |result − expected| over a matrix.
    static func maxDifference(_ result: Matrix, _ expected: [[Double]]) -> Double {
        var worst = 0.0
        for i in 0..<result.rows { for j in 0..<result.cols {
            worst = max(worst, abs(Double(result[i, j]) - expected[i][j]))
        } }
        return worst
    }

    /// ‖B_k A_k‖_F formed densely in Double.
    static func denseProductNorm(_ client: ClientUpdate) -> Double {
        var squared = 0.0
        for i in 0..<client.b.rows { for j in 0..<client.a.cols {
            var entry = 0.0
            for t in 0..<client.rank { entry += Double(client.b[i, t]) * Double(client.a[t, j]) }
            squared += entry * entry
        } }
        return squared.squareRoot()
    }

    /// PEFT's scaling: α/r, or α/√r with rsLoRA.
    static func peftScaling(alpha: Double, rank: Int, rsLoRA: Bool) -> Double {
        rsLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank)
    }
}
