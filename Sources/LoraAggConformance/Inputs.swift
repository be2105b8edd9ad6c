import LoraAggCore

/// Deterministic inputs for the checks: small, non-square modules with rank
/// ≥ 2 and per-client scalings ≠ 1 (α/r and rsLoRA α/√r mixed in one round).
///
/// Every round is built from a seed, so a failing check reproduces exactly.
struct InputFactory: Sendable {
    /// Whether the plugin needs every client to hold the same A (FFA-LoRA):
    /// then all clients of a round get prefixes of one shared A.
    let sharedA: Bool
    /// Whether the plugin accepts clients of different ranks; the invariance
    /// checks then use mixed ranks too, so they cover that code path.
    let heterogeneous: Bool

    /// SplitMix64, so that inputs never depend on the system RNG.
    typealias Generator = Synthetic.Generator

    /// A client's recipe: rank, LoRA alpha, whether rsLoRA scaling is used, samples.
    struct Spec {
        var rank: Int
        var alpha: Double
        var rsLoRA: Bool
        var samples: Double
        /// PEFT's scaling: α/r, or α/√r with rsLoRA.
        var scaling: Double { rsLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank) }
    }

    /// The default mixed round: four clients, unequal samples, scalings
    /// 16/r, 16/r, 16/√r (rsLoRA) and 4/r; ranks 3 (or 2, 4, 3, 4 when the
    /// plugin accepts heterogeneous ranks).
    func standardSpecs() -> [Spec] {
        let ranks = heterogeneous ? [2, 4, 3, 4] : [3, 3, 3, 3]
        return [Spec(rank: ranks[0], alpha: 16, rsLoRA: false, samples: 10),
                Spec(rank: ranks[1], alpha: 16, rsLoRA: false, samples: 25),
                Spec(rank: ranks[2], alpha: 16, rsLoRA: true, samples: 40),
                Spec(rank: ranks[3], alpha: 4, rsLoRA: false, samples: 5)]
    }

    /// Clients with random factors: A entries in [-0.5, 0.5), B entries in
    /// [-0.1, 0.1) (trained B stays small), non-square d_out×d_in.
    func clients(_ specs: [Spec], dOut: Int, dIn: Int, seed: UInt64) -> [ClientUpdate] {
        var generator = Generator(seed: seed)
        func matrix(_ rows: Int, _ cols: Int, _ scale: Float) -> Matrix {
            Matrix(rows: rows, cols: cols,
                   values: (0..<(rows * cols)).map { _ in scale * Float.random(in: -1..<1, using: &generator) })
        }
        let maxRank = specs.map(\.rank).max() ?? 0
        let shared = matrix(maxRank, dIn, 0.5)
        return specs.enumerated().map { k, spec in
            let a = sharedA
                ? Matrix(rows: spec.rank, cols: dIn, values: Array(shared.values.prefix(spec.rank * dIn)))
                : matrix(spec.rank, dIn, 0.5)
            return ClientUpdate(id: "client-\(k)", samples: spec.samples, scaling: spec.scaling,
                                a: a, b: matrix(dOut, spec.rank, 0.1))
        }
    }
}
