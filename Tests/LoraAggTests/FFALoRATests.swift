import Testing
import LoraAggCore
import LoraAggHost

@Suite("ffa-lora")
struct FFALoRATests {
    /// A shared 2×3 A and two clients' 4×2 B, samples 1:3, worked out by hand:
    /// B̄ = .25·B_0 + .75·B_1.
    static let sharedA = Matrix(rows: 2, cols: 3, values: [1, -2, 0.5, 3, 0, -1])

    static func client(_ id: String, samples: Double, scaling: Double = 2, a: Matrix = sharedA, b: [Float]) -> ClientUpdate {
        ClientUpdate(id: id, samples: samples, scaling: scaling, a: a, b: Matrix(rows: 4, cols: 2, values: b))
    }

    @Test("a hand-derived case on a non-square module keeps A and averages B")
    func handDerived() throws {
        let clients = [Self.client("x", samples: 1, b: [4, 0, -4, 8, 1, 1, 0, 2]),
                       Self.client("y", samples: 3, b: [0, 4, 4, 0, 1, -3, 2, 2])]
        let result = try PaddedFactors.aggregate("ffa-lora", clients, dOut: 4, dIn: 3)
        #expect(result.a == Self.sharedA)
        // .25·[4, 0, −4, 8, 1, 1, 0, 2] + .75·[0, 4, 4, 0, 1, −3, 2, 2]
        #expect(result.b == Matrix(rows: 4, cols: 2, values: [1, 3, 2, 2, 1, -2, 1.5, 2]))
        #expect(result.scaling == 2)
    }

    @Test("different scalings (α/r and rsLoRA α/√r) are folded wholly into B: s_k/s, A untouched")
    func mixedScalingsHandDerived() throws {
        // r = 2: α = 4 gives α/r = 2; rsLoRA α = 4 gives 4/√2 = 2√2. Equal samples: s = 1 + √2.
        let s0 = PaddedFactors.peftScaling(alpha: 4, rank: 2, rsLoRA: false)
        let s1 = PaddedFactors.peftScaling(alpha: 4, rank: 2, rsLoRA: true)
        let clients = [Self.client("x", samples: 1, scaling: s0, b: [1, 0, 0, 1, 1, 1, 0, 0]),
                       Self.client("y", samples: 1, scaling: s1, b: [0, 1, 1, 0, 1, -1, 2, 2])]
        let result = try PaddedFactors.aggregate("ffa-lora", clients, dOut: 4, dIn: 3)
        let s = 1 + 2.0.squareRoot()
        #expect(abs(result.scaling - s) < 1e-12)
        #expect(result.a == Self.sharedA)
        let w0 = 0.5 * s0 / s, w1 = 0.5 * s1 / s
        let b0: [Double] = [1, 0, 0, 1, 1, 1, 0, 0], b1: [Double] = [0, 1, 1, 0, 1, -1, 2, 2]
        for i in 0..<8 { #expect(abs(Double(result.b.values[i]) - (w0 * b0[i] + w1 * b1[i])) < 1e-6) }
    }

    @Test("the effective update equals Σ p_k s_k B_k A_k to round-off, with mixed scalings")
    func exact() throws {
        var generator = TestSupport.SeededGenerator(seed: 47)
        let a = TestSupport.randomMatrix(4, 9, &generator)
        let scalings = [PaddedFactors.peftScaling(alpha: 8, rank: 4, rsLoRA: false),
                        PaddedFactors.peftScaling(alpha: 8, rank: 4, rsLoRA: true),
                        PaddedFactors.peftScaling(alpha: 32, rank: 4, rsLoRA: false)]
        let clients = scalings.indices.map {
            ClientUpdate(id: "c\($0)", samples: Double(5 + 11 * $0), scaling: scalings[$0], a: a,
                         b: TestSupport.randomMatrix(12, 4, &generator))
        }
        let result = try PaddedFactors.aggregate("ffa-lora", clients, dOut: 12, dIn: 9)
        let ideal = ModuleRound.withRound(module: "m", dOut: 12, dIn: 9, clients: clients) { Reference.idealUpdate($0) }
        #expect(Reference.relativeError(Reference.effectiveUpdate(result, dOut: 12, dIn: 9), ideal) < 1e-6)
        // FedIT on the same round is not exact, which shows the round can tell.
        let fedIT = try PaddedFactors.aggregate("fedit", clients, dOut: 12, dIn: 9)
        #expect(Reference.relativeError(Reference.effectiveUpdate(fedIT, dOut: 12, dIn: 9), ideal) > 1e-3)
    }

    @Test("a client whose A differs is refused with an error naming the module and that client")
    func refusesDifferentA() throws {
        var generator = TestSupport.SeededGenerator(seed: 53)
        let a = TestSupport.randomMatrix(3, 5, &generator)
        var clients = (0..<3).map {
            ClientUpdate(id: "client-\($0)", samples: 10, scaling: 2, a: a, b: TestSupport.randomMatrix(4, 3, &generator))
        }
        clients[2].a[1, 4] += 1e-3
        let error = #expect(throws: AggregationError.self) {
            try PaddedFactors.aggregate("ffa-lora", clients, dOut: 4, dIn: 5, module: "layers.3.v_proj")
        }
        let message = try #require(error?.message)
        #expect(message.contains("'layers.3.v_proj'"))
        #expect(message.contains("'client-2'"))
        #expect(!message.contains("'client-1'"))
        #expect(!message.contains("\n"))
    }

    @Test("round-off differences in A are accepted; the tolerance is a parameter")
    func toleranceOfSharedA() throws {
        var generator = TestSupport.SeededGenerator(seed: 59)
        let a = TestSupport.randomMatrix(2, 6, &generator)
        var clients = (0..<2).map {
            ClientUpdate(id: "c\($0)", samples: 1, scaling: 1, a: a, b: TestSupport.randomMatrix(3, 2, &generator))
        }
        let largest = a.values.map(abs).max()!
        clients[1].a[0, 0] += largest * 1e-7
        let result = try PaddedFactors.aggregate("ffa-lora", clients, dOut: 3, dIn: 6)
        #expect(result.a == a)
        clients[1].a[0, 0] += largest * 1e-4
        #expect(throws: AggregationError.self) { try PaddedFactors.aggregate("ffa-lora", clients, dOut: 3, dIn: 6) }
        _ = try PaddedFactors.aggregate("ffa-lora", clients, dOut: 3, dIn: 6, parameters: ["tolerance=1e-3"])
    }

    @Test("NaN in a client's A is reported as non-finite, not as a different A")
    func nonFiniteA() throws {
        var generator = TestSupport.SeededGenerator(seed: 61)
        let a = TestSupport.randomMatrix(2, 3, &generator)
        var clients = (0..<2).map {
            ClientUpdate(id: "c\($0)", samples: 1, scaling: 1, a: a, b: TestSupport.randomMatrix(4, 2, &generator))
        }
        clients[1].a[1, 1] = .nan
        let error = #expect(throws: AggregationError.self) { try PaddedFactors.aggregate("ffa-lora", clients, dOut: 4, dIn: 3) }
        #expect(error?.message.contains("'c1'") == true)
        #expect(error?.message.contains("NaN") == true)
    }

    @Test("clients of different ranks are refused with an error naming the ranks")
    func refusesMixedRanks() throws {
        var generator = TestSupport.SeededGenerator(seed: 67)
        let clients = [TestSupport.randomClient("small", rank: 2, dOut: 4, dIn: 3, &generator),
                       TestSupport.randomClient("large", rank: 3, dOut: 4, dIn: 3, &generator)]
        let error = #expect(throws: AggregationError.self) { try PaddedFactors.aggregate("ffa-lora", clients, dOut: 4, dIn: 3) }
        #expect(error?.message.contains("'small' r=2") == true)
        #expect(error?.message.contains("'large' r=3") == true)
    }
}
