import Testing
import LoraAggCore
import LoraAggHost

@Suite("zero-pad")
struct ZeroPadTests {
    /// Ranks 1 and 2 on a 3×2 module, samples 1:3, worked out by hand:
    /// Ā[0] = .25·[1, 2] + .75·[3, −1] = [2.5, −0.25],  Ā[1] = .75·[2, 4] = [1.5, 3],
    /// B̄[:,0] = .25·[1, 0, −1] + .75·[2, 2, 2] = [1.75, 1.5, 1.25],  B̄[:,1] = .75·[0, 1, −2].
    static let handClients = [
        ClientUpdate(id: "low", samples: 1, scaling: 2,
                     a: Matrix(rows: 1, cols: 2, values: [1, 2]),
                     b: Matrix(rows: 3, cols: 1, values: [1, 0, -1])),
        ClientUpdate(id: "high", samples: 3, scaling: 2,
                     a: Matrix(rows: 2, cols: 2, values: [3, -1, 2, 4]),
                     b: Matrix(rows: 3, cols: 2, values: [2, 0, 2, 1, 2, -2])),
    ]

    @Test("a hand-derived case with ranks 1 and 2 on a non-square module pads with zeros")
    func handDerived() throws {
        let result = try PaddedFactors.aggregate("zero-pad", Self.handClients, dOut: 3, dIn: 2)
        #expect(result.a == Matrix(rows: 2, cols: 2, values: [2.5, -0.25, 1.5, 3]))
        #expect(result.b == Matrix(rows: 3, cols: 2, values: [1.75, 0, 1.5, 0.75, 1.25, -1.5]))
        #expect(result.scaling == 2)
        #expect(result.clientPayloads == nil)
    }

    @Test("random mixed ranks match the padded sample-weighted sums computed in Double")
    func mixedRanksRandom() throws {
        var generator = TestSupport.SeededGenerator(seed: 11)
        let ranks = [3, 1, 5, 3], samples: [Double] = [5, 10, 20, 15]
        let clients = ranks.indices.map {
            TestSupport.randomClient("c\($0)", rank: ranks[$0], dOut: 9, dIn: 6, samples: samples[$0], &generator)
        }
        let result = try PaddedFactors.aggregate("zero-pad", clients, dOut: 9, dIn: 6)
        let expected = PaddedFactors.paddedSums(clients, rank: 5, dOut: 9, dIn: 6) { k, _ in samples[k] / 50 }
        #expect(result.rank == 5)
        #expect(PaddedFactors.maxDifference(result.a, expected.a) < PaddedFactors.tolerance)
        #expect(PaddedFactors.maxDifference(result.b, expected.b) < PaddedFactors.tolerance)
    }

    @Test("norm weighting reproduces HetLoRA's weights ‖B_k A_k‖_F / Σ‖B_j A_j‖_F, formed densely")
    func hetLoRAWeights() throws {
        var generator = TestSupport.SeededGenerator(seed: 23)
        let ranks = [2, 4, 3]
        // Different sample counts must not matter: HetLoRA ignores n_k.
        let clients = ranks.indices.map {
            TestSupport.randomClient("c\($0)", rank: ranks[$0], dOut: 7, dIn: 5, samples: Double(1 + 7 * $0), &generator)
        }
        let norms = clients.map(PaddedFactors.denseProductNorm)
        let weights = norms.map { $0 / norms.reduce(0, +) }
        let result = try PaddedFactors.aggregate("zero-pad", clients, dOut: 7, dIn: 5, parameters: ["weighting=norm"])
        for k in clients.indices {
            let reported = try #require(result.diagnostic("weight_\(k)"))
            #expect(abs(reported - weights[k]) < 1e-6)
        }
        #expect(result.diagnostic("norm_fallback") == 0)
        let expected = PaddedFactors.paddedSums(clients, rank: 4, dOut: 7, dIn: 5) { k, _ in weights[k] }
        #expect(PaddedFactors.maxDifference(result.a, expected.a) < PaddedFactors.tolerance)
        #expect(PaddedFactors.maxDifference(result.b, expected.b) < PaddedFactors.tolerance)
        // The weights really are not the sample weights on this data.
        let sampleResult = try PaddedFactors.aggregate("zero-pad", clients, dOut: 7, dIn: 5)
        #expect(PaddedFactors.maxDifference(sampleResult.a, expected.a) > 1e-3)
    }

    @Test("norm weights include s_k when scalings differ (α/r against rsLoRA α/√r)")
    func normWeightsWithMixedScalings() throws {
        var generator = TestSupport.SeededGenerator(seed: 5)
        let s0 = PaddedFactors.peftScaling(alpha: 16, rank: 4, rsLoRA: false)   // 4
        let s1 = PaddedFactors.peftScaling(alpha: 16, rank: 8, rsLoRA: true)    // 16/√8
        let clients = [
            TestSupport.randomClient("plain", rank: 4, dOut: 6, dIn: 5, samples: 10, scaling: s0, &generator),
            TestSupport.randomClient("rslora", rank: 8, dOut: 6, dIn: 5, samples: 30, scaling: s1, &generator),
        ]
        let norms = [s0 * PaddedFactors.denseProductNorm(clients[0]), s1 * PaddedFactors.denseProductNorm(clients[1])]
        let weights = norms.map { $0 / (norms[0] + norms[1]) }
        let s = 0.25 * s0 + 0.75 * s1
        let rescale = [(s0 / s).squareRoot(), (s1 / s).squareRoot()]
        let result = try PaddedFactors.aggregate("zero-pad", clients, dOut: 6, dIn: 5, parameters: ["weighting=norm"])
        #expect(abs(result.scaling - s) < 1e-12)
        #expect(abs(try #require(result.diagnostic("weight_0")) - weights[0]) < 1e-6)
        let expected = PaddedFactors.paddedSums(clients, rank: 8, dOut: 6, dIn: 5) { k, _ in weights[k] * rescale[k] }
        #expect(PaddedFactors.maxDifference(result.a, expected.a) < PaddedFactors.tolerance)
        #expect(PaddedFactors.maxDifference(result.b, expected.b) < PaddedFactors.tolerance)
    }

    @Test("two clients applying the same update at scalings α/r and α/√r aggregate to exactly that update")
    func sameUpdateDifferentScalings() throws {
        var generator = TestSupport.SeededGenerator(seed: 3)
        let base = TestSupport.randomClient("base", rank: 4, dOut: 6, dIn: 3, &generator)
        // r = 4, α = 8: α/r = 2; with rsLoRA α/√r = 4, so factors ÷√2 give the same product.
        let half = Float(0.5).squareRoot()
        let plain = ClientUpdate(id: "plain", samples: 1, scaling: PaddedFactors.peftScaling(alpha: 8, rank: 4, rsLoRA: false),
                                 a: base.a, b: base.b)
        let rs = ClientUpdate(id: "rslora", samples: 1, scaling: PaddedFactors.peftScaling(alpha: 8, rank: 4, rsLoRA: true),
                              a: Matrix(rows: 4, cols: 3, values: base.a.values.map { $0 * half }),
                              b: Matrix(rows: 6, cols: 4, values: base.b.values.map { $0 * half }))
        for weighting in ["samples", "norm"] {
            let result = try PaddedFactors.aggregate("zero-pad", [plain, rs], dOut: 6, dIn: 3, parameters: ["weighting=\(weighting)"])
            let update = ModuleRound.withRound(module: "m", dOut: 6, dIn: 3, clients: [plain]) { Reference.idealUpdate($0) }
            #expect(Reference.relativeError(Reference.effectiveUpdate(result, dOut: 6, dIn: 3), update) < 1e-5)
        }
    }

    @Test("equal ranks with sample weights are FedIT, bit for bit")
    func equalRanksIsFedIT() throws {
        var generator = TestSupport.SeededGenerator(seed: 9)
        let clients = (0..<4).map {
            TestSupport.randomClient("c\($0)", rank: 3, dOut: 8, dIn: 5, samples: Double(3 + $0), scaling: Double(1 + $0 % 2), &generator)
        }
        let zeroPad = try PaddedFactors.aggregate("zero-pad", clients, dOut: 8, dIn: 5)
        let fedIT = try PaddedFactors.aggregate("fedit", clients, dOut: 8, dIn: 5)
        #expect(zeroPad == fedIT)
    }

    @Test("norm weighting ignores clients without samples and falls back to samples when every update is zero")
    func normEdgeCases() throws {
        var generator = TestSupport.SeededGenerator(seed: 13)
        var clients = (0..<3).map { TestSupport.randomClient("c\($0)", rank: 2, dOut: 4, dIn: 3, samples: 10, &generator) }
        clients[1].samples = 0
        let result = try PaddedFactors.aggregate("zero-pad", clients, dOut: 4, dIn: 3, parameters: ["weighting=norm"])
        #expect(result.diagnostic("weight_1") == 0)
        // PEFT's initial state: B = 0, so every product is zero.
        for k in clients.indices { clients[k].b = Matrix(zeros: 4, 2) }
        clients[2].samples = 30
        let initial = try PaddedFactors.aggregate("zero-pad", clients, dOut: 4, dIn: 3, parameters: ["weighting=norm"])
        #expect(initial.diagnostic("norm_fallback") == 1)
        #expect(initial.diagnostic("weight_0") == 0.25)
        #expect(initial.diagnostic("weight_2") == 0.75)
    }

    @Test("an unrecognized weighting is refused when the strategy is created")
    func refusesUnknownWeighting() throws {
        let error = #expect(throws: AggregationError.self) {
            try TestSupport.registry.plugin(named: "zero-pad").makeAggregator(assignments: ["weighting=frobenius"])
        }
        #expect(error?.message.contains("'frobenius'") == true)
    }
}
