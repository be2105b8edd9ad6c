import Testing
import LoraAggCore
import LoraAggHost

@Suite("flora")
struct FLoRATests {
    static func aggregate(_ clients: [ClientUpdate], dOut: Int, dIn: Int, _ assignments: [String] = []) throws -> AggregationResult {
        let aggregator = try TestSupport.registry.plugin(named: "flora").makeAggregator(assignments: assignments)
        return try ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    @Test("a hand-checked stack: A blocks carry p_k s_k / s, B blocks are the clients' B")
    func handChecked() throws {
        // p = (0.25, 0.75), s = (2, 0.5): s = 0.25·2 + 0.75·0.5 = 0.875,
        // c_0 = 0.5/0.875 = 4/7, c_1 = 0.375/0.875 = 3/7.
        let clients = [
            ClientUpdate(id: "x", samples: 1, scaling: 2, a: Matrix(rows: 1, cols: 3, values: [1, 2, 3]),
                         b: Matrix(rows: 2, cols: 1, values: [5, 6])),
            ClientUpdate(id: "y", samples: 3, scaling: 0.5, a: Matrix(rows: 2, cols: 3, values: [7, 0, -7, 1, 1, 1]),
                         b: Matrix(rows: 2, cols: 2, values: [1, 2, 3, 4])),
        ]
        let result = try Self.aggregate(clients, dOut: 2, dIn: 3)
        #expect(result.rank == 3)
        #expect(abs(result.scaling - 0.875) < 1e-12)
        let expectedA: [Double] = [4, 8, 12, 21, 0, -21, 3, 3, 3].map { $0 / 7 }
        #expect(zip(result.a.values, expectedA).allSatisfy { abs(Double($0) - $1) < 1e-6 })
        #expect(result.b.values == [5, 1, 2, 6, 3, 4])
    }

    @Test("the stacked product equals Σ p_k s_k B_k A_k for mixed ranks and α/r, rsLoRA scalings")
    func exactForMixedRanks() throws {
        var generator = TestSupport.SeededGenerator(seed: 41)
        let (dOut, dIn) = (6, 11)
        let clients = [
            TestSupport.randomClient("r1", rank: 1, dOut: dOut, dIn: dIn, samples: 3, scaling: 16, &generator),
            TestSupport.randomClient("r3", rank: 3, dOut: dOut, dIn: dIn, samples: 10, scaling: 16.0 / 3, &generator),
            TestSupport.randomClient("r4", rank: 4, dOut: dOut, dIn: dIn, samples: 7, scaling: 16.0 / 2, &generator),
        ]
        let result = try Self.aggregate(clients, dOut: dOut, dIn: dIn)
        #expect(result.rank == 8)
        let ideal = ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { Reference.idealUpdate($0) }
        #expect(Reference.relativeError(Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn), ideal) < 1e-6)
    }

    @Test("equal scalings keep s and scale A blocks by p_k only")
    func equalScalings() throws {
        var generator = TestSupport.SeededGenerator(seed: 42)
        let clients = [TestSupport.randomClient("a", rank: 2, dOut: 3, dIn: 4, samples: 1, scaling: 2, &generator),
                       TestSupport.randomClient("b", rank: 2, dOut: 3, dIn: 4, samples: 4, scaling: 2, &generator)]
        let result = try Self.aggregate(clients, dOut: 3, dIn: 4)
        #expect(result.scaling == 2)
        #expect(result.a.values == clients[0].a.values.map { $0 * 0.2 } + clients[1].a.values.map { $0 * 0.8 })
    }

    @Test("downlink=residual returns the stack as the base residual and a fresh, trainable LoRA")
    func residualDownlink() throws {
        var generator = TestSupport.SeededGenerator(seed: 43)
        let (dOut, dIn) = (7, 5)
        let clients = [
            TestSupport.randomClient("r2", rank: 2, dOut: dOut, dIn: dIn, samples: 2, scaling: 8, &generator),
            TestSupport.randomClient("r3", rank: 3, dOut: dOut, dIn: dIn, samples: 6, scaling: 16.0 / 3.0.squareRoot(), &generator),
        ]
        let result = try Self.aggregate(clients, dOut: dOut, dIn: dIn, ["downlink=residual"])
        let residual = try #require(result.residual)
        #expect(residual.rank == 5)
        #expect(result.rank == 3 && result.b.values.allSatisfy { $0 == 0 })
        for slot in 0..<3 { #expect((0..<dIn).contains { result.a[slot, $0] != 0 }, "A row \(slot) can train") }
        let ideal = ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { Reference.idealUpdate($0) }
        #expect(Reference.relativeError(Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn), ideal) < 1e-6)
        // The stack and the residual are the same update.
        let stacked = try Self.aggregate(clients, dOut: dOut, dIn: dIn)
        #expect(residual.u == stacked.b)
    }
}
