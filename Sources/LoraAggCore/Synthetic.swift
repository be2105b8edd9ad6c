/// Seeded synthetic clients for the demo, the benchmark and the conformance suite.
///
/// Clients share a common low-rank direction and add a client-specific one
/// (non-IID), which is what makes FedIT's aggregation bias visible: the
/// average of products differs from the product of averages exactly by the
/// spread of the client-specific parts.
public enum Synthetic {
    /// A small, fast, deterministic generator (SplitMix64).
    public struct Generator: RandomNumberGenerator, Sendable {
        private var state: UInt64
        /// A generator whose sequence depends only on `seed`.
        public init(seed: UInt64) { state = seed }
        public mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        /// A uniform Float in [-1, 1).
        public mutating func symmetric() -> Float {
            Float(next() >> 40) * (2.0 / Float(1 << 24)) - 1
        }
    }

    /// How α relates to r in the synthetic clients.
    public enum ScalingRule: Sendable {
        /// α fixed, s = α/r (PEFT's default; clients of different ranks get different s).
        case alphaOverRank(alpha: Double)
        /// rsLoRA, s = α/√r.
        case rsLoRA(alpha: Double)

        /// The scaling of a client of rank `r`.
        public func scaling(rank: Int) -> Double {
            switch self {
            case .alphaOverRank(let alpha): return alpha / Double(rank)
            case .rsLoRA(let alpha): return alpha / Double(rank).squareRoot()
            }
        }
    }

    /// Clients for one module: factor = shared part + `heterogeneity` × client part.
    ///
    /// - Parameters:
    ///   - ranks: one rank per client.
    ///   - samples: sample counts, one per client (defaults to 100, 200, …).
    ///   - heterogeneity: 0 gives identical clients (up to rank truncation); 1 gives a client part as large as the shared part.
    public static func clients(seed: UInt64, dOut: Int, dIn: Int, ranks: [Int], samples: [Double]? = nil,
                               scaling: ScalingRule = .alphaOverRank(alpha: 16),
                               heterogeneity: Float = 0.8) -> [ClientUpdate] {
        var generator = Generator(seed: seed)
        let maxRank = ranks.max() ?? 0
        let scale = 1 / Float(max(dIn, 1)).squareRoot()
        let sharedA = (0..<(maxRank * dIn)).map { _ in generator.symmetric() * scale }
        let sharedB = (0..<(dOut * maxRank)).map { _ in generator.symmetric() * 0.1 }
        return ranks.enumerated().map { k, rank in
            let a = Matrix(rows: rank, cols: dIn) { i, j in
                sharedA[i * dIn + j] + heterogeneity * generator.symmetric() * scale
            }
            let b = Matrix(rows: dOut, cols: rank) { i, j in
                sharedB[i * maxRank + j] + heterogeneity * generator.symmetric() * 0.1
            }
            return ClientUpdate(id: "client-\(k)", samples: samples?[k] ?? Double(100 * (k + 1)),
                                scaling: scaling.scaling(rank: rank), a: a, b: b)
        }
    }
}
