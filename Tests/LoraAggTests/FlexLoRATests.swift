import Testing
import LoraAggCore
import LoraAggHost

@Suite("flexlora")
struct FlexLoRATests {
    static func aggregate(_ clients: [ClientUpdate], dOut: Int, dIn: Int) throws -> AggregationResult {
        let aggregator = try TestSupport.registry.plugin(named: "flexlora").makeAggregator()
        return try ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    @Test("a hand-solved round: each client gets its top-r_k triplets, B divided by its own scaling")
    func handChecked() throws {
        // W = 0.25·2·e1[1,0] + 0.75·1·(2·e2[0,1] + e3[1,0]) = 0.5 e1e1ᵀ + 1.5 e2e2ᵀ + 0.75 e3e1ᵀ.
        // Columns are orthogonal, so σ1 = 1.5 (u = e2, v = e2) and
        // σ2 = √(0.5² + 0.75²) = √0.8125 (u = (0.5, 0, 0.75)/σ2, v = e1).
        let clients = [
            ClientUpdate(id: "r1", samples: 1, scaling: 2, a: Matrix(rows: 1, cols: 2, values: [1, 0]),
                         b: Matrix(rows: 3, cols: 1, values: [1, 0, 0])),
            ClientUpdate(id: "r2", samples: 3, scaling: 1, a: Matrix(rows: 2, cols: 2, values: [0, 1, 1, 0]),
                         b: Matrix(rows: 3, cols: 2, values: [0, 0, 2, 0, 0, 1])),
        ]
        let result = try Self.aggregate(clients, dOut: 3, dIn: 2)
        let payloads = try #require(result.clientPayloads)
        let tolerance: Float = 1e-6
        // Client r1 (rank 1, s = 2): A = [0, 1], B = (0, 1.5/2, 0).
        #expect(payloads[0].scaling == 2)
        #expect(zip(payloads[0].a.values, [0, 1]).allSatisfy { abs($0 - $1) < tolerance })
        #expect(zip(payloads[0].b.values, [0, 0.75, 0]).allSatisfy { abs($0 - $1) < tolerance })
        // Client r2 (rank 2, s = 1): A = [[0, 1], [1, 0]], B = [[0, 0.5], [1.5, 0], [0, 0.75]]: W exactly.
        #expect(payloads[1].scaling == 1)
        #expect(zip(payloads[1].a.values, [0, 1, 1, 0]).allSatisfy { abs($0 - $1) < tolerance })
        #expect(zip(payloads[1].b.values, [0, 0.5, 1.5, 0, 0, 0.75]).allSatisfy { abs($0 - $1) < tolerance })
        // Truncation errors: σ2/‖W‖ for r1, 0 for r2.
        let sigma2 = 0.8125.squareRoot(), norm = (2.25 + 0.8125).squareRoot()
        #expect(abs(try #require(result.diagnostic("truncation_error_0")) - sigma2 / norm) < 1e-6)
        #expect(try #require(result.diagnostic("truncation_error_1")) < 1e-6)
        // Global: rank 2 at the mean scaling 0.25·2 + 0.75·1 = 1.25.
        #expect(abs(result.scaling - 1.25) < 1e-12)
        #expect(zip(result.b.values, [0, 0.4, 1.2, 0, 0, 0.6]).allSatisfy { abs($0 - $1) < tolerance })
    }

    @Test("payloads match a dense SVD of the same sum, with mixed ranks and α/r and rsLoRA scalings")
    func matchesDenseSVD() throws {
        var generator = TestSupport.SeededGenerator(seed: 31)
        let (dOut, dIn) = (9, 13)
        let clients = [
            TestSupport.randomClient("a", rank: 2, dOut: dOut, dIn: dIn, samples: 10, scaling: 16.0 / 2, &generator),
            TestSupport.randomClient("b", rank: 3, dOut: dOut, dIn: dIn, samples: 25, scaling: 16.0 / 3, &generator),
            TestSupport.randomClient("c", rank: 5, dOut: dOut, dIn: dIn, samples: 5, scaling: 16.0 / 5.0.squareRoot(), &generator),
        ]
        let result = try Self.aggregate(clients, dOut: dOut, dIn: dIn)
        let (ideal, truth) = ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { round in
            let ideal = Reference.idealUpdate(round)
            return (ideal, DenseSVD.decompose(ideal, rows: dOut, cols: dIn))
        }
        let payloads = try #require(result.clientPayloads)
        for (k, client) in clients.enumerated() {
            let expected = truth.truncated(client.rank, rows: dOut, cols: dIn)
            let received = Reference.clientUpdate(result, client: k, rank: client.rank, dOut: dOut, dIn: dIn)
            #expect(Reference.relativeError(received, expected) < 1e-5, "client \(client.id)")
            #expect(payloads[k].rank == client.rank && payloads[k].scaling == client.scaling)
            let lost = Reference.relativeError(expected, ideal)
            #expect(abs(try #require(result.diagnostic("truncation_error_\(k)")) - lost) < 1e-6)
            #expect(lost > 0.01, "the test data must really truncate")
        }
        let global = Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn)
        #expect(result.rank == 5)
        #expect(Reference.relativeError(global, truth.truncated(5, rows: dOut, cols: dIn)) < 1e-5)
    }

    @Test("a client rank above min(d_out, d_in) gets B = 0 and trainable A rows in the extra slots")
    func rankAboveModuleSize() throws {
        var generator = TestSupport.SeededGenerator(seed: 32)
        let clients = [
            TestSupport.randomClient("big", rank: 6, dOut: 4, dIn: 3, samples: 1, scaling: 2, &generator),
            TestSupport.randomClient("small", rank: 1, dOut: 4, dIn: 3, samples: 1, scaling: 2, &generator),
        ]
        let result = try Self.aggregate(clients, dOut: 4, dIn: 3)
        let big = try #require(result.clientPayloads?[0])
        #expect(big.rank == 6)
        for slot in 3..<6 {
            #expect((0..<4).allSatisfy { big.b[$0, slot] == 0 }, "B column \(slot) is zero")
            #expect((0..<3).contains { big.a[slot, $0] != 0 }, "A row \(slot) is not zero")
        }
        // The rank-3 module is reproduced exactly by the rank-6 client.
        let ideal = ModuleRound.withRound(module: "m", dOut: 4, dIn: 3, clients: clients) { Reference.idealUpdate($0) }
        #expect(Reference.relativeError(Reference.clientUpdate(result, client: 0, rank: 6, dOut: 4, dIn: 3), ideal) < 1e-5)
        #expect(try #require(result.diagnostic("truncation_error_0")) < 1e-6)
    }

    @Test("reordering the clients gives the same factors, not just the same product")
    func orderIndependent() throws {
        var generator = TestSupport.SeededGenerator(seed: 33)
        let clients = (0..<3).map { TestSupport.randomClient("c\($0)", rank: 2 + $0, dOut: 7, dIn: 5, samples: Double(1 + $0), &generator) }
        let forward = try Self.aggregate(clients, dOut: 7, dIn: 5)
        let backward = try Self.aggregate(clients.reversed(), dOut: 7, dIn: 5)
        #expect(zip(forward.a.values, backward.a.values).allSatisfy { abs($0 - $1) < 1e-5 })
        #expect(zip(forward.b.values, backward.b.values).allSatisfy { abs($0 - $1) < 1e-5 })
        let first = try #require(forward.clientPayloads?[0]), last = try #require(backward.clientPayloads?[2])
        #expect(zip(first.b.values, last.b.values).allSatisfy { abs($0 - $1) < 1e-5 })
    }
}
