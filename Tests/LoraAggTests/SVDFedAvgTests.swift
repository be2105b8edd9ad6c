import Testing
import LoraAggCore
import LoraAggHost

@Suite("svd-fedavg")
struct SVDFedAvgTests {
    static func aggregate(_ clients: [ClientUpdate], dOut: Int, dIn: Int, _ assignments: [String] = []) throws -> AggregationResult {
        let aggregator = try TestSupport.registry.plugin(named: "svd-fedavg").makeAggregator(assignments: assignments)
        return try ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    static let handClients = [
        // W = 0.5 e1e1ᵀ + 1.5 e2e2ᵀ + 0.75 e3e1ᵀ: σ = (1.5, √0.8125), see FlexLoRATests.
        ClientUpdate(id: "r1", samples: 1, scaling: 2, a: Matrix(rows: 1, cols: 2, values: [1, 0]),
                     b: Matrix(rows: 3, cols: 1, values: [1, 0, 0])),
        ClientUpdate(id: "r2", samples: 3, scaling: 1, a: Matrix(rows: 2, cols: 2, values: [0, 1, 1, 0]),
                     b: Matrix(rows: 3, cols: 2, values: [0, 0, 2, 0, 0, 1])),
    ]

    @Test("a hand-solved rank-1 truncation: A = v₁ᵀ, B = u₁σ₁/s, energy kept σ₁²/Σσ²")
    func handChecked() throws {
        let result = try Self.aggregate(Self.handClients, dOut: 3, dIn: 2, ["rank=1"])
        #expect(result.rank == 1)
        #expect(abs(result.scaling - 1.25) < 1e-12)
        #expect(zip(result.a.values, [0, 1]).allSatisfy { abs($0 - $1) < 1e-6 })
        #expect(zip(result.b.values, [0, 1.2, 0]).allSatisfy { abs($0 - $1) < 1e-6 })
        #expect(abs(try #require(result.diagnostic("energy_kept")) - 2.25 / 3.0625) < 1e-6)
        #expect(abs(try #require(result.diagnostic("relative_error")) - (0.8125 / 3.0625).squareRoot()) < 1e-6)
    }

    @Test("energy kept and the truncated product match a dense SVD on a non-square module")
    func matchesDense() throws {
        var generator = TestSupport.SeededGenerator(seed: 61)
        let (dOut, dIn) = (10, 7)
        let clients = [
            TestSupport.randomClient("a", rank: 2, dOut: dOut, dIn: dIn, samples: 4, scaling: 8, &generator),
            TestSupport.randomClient("b", rank: 3, dOut: dOut, dIn: dIn, samples: 9, scaling: 16.0 / 3.0.squareRoot(), &generator),
            TestSupport.randomClient("c", rank: 4, dOut: dOut, dIn: dIn, samples: 2, scaling: 1, &generator),
        ]
        let ideal = ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { Reference.idealUpdate($0) }
        let truth = DenseSVD.decompose(ideal, rows: dOut, cols: dIn)
        let total = truth.sigma.reduce(0) { $0 + $1 * $1 }
        for rank in [1, 3, 4] {
            let result = try Self.aggregate(clients, dOut: dOut, dIn: dIn, rank == 4 ? [] : ["rank=\(rank)"])
            #expect(result.rank == rank, "rank 4 is the default: the largest client rank")
            let kept = truth.sigma.prefix(rank).reduce(0) { $0 + $1 * $1 } / total
            #expect(abs(try #require(result.diagnostic("energy_kept")) - kept) < 1e-6)
            let expected = truth.truncated(rank, rows: dOut, cols: dIn)
            #expect(Reference.relativeError(Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn), expected) < 1e-5)
        }
        let exact = try Self.aggregate(clients, dOut: dOut, dIn: dIn, ["exact=true"])
        #expect(exact.rank == 7)
        #expect(Reference.relativeError(Reference.effectiveUpdate(exact, dOut: dOut, dIn: dIn), ideal) < 1e-5)
        #expect(abs(try #require(exact.diagnostic("energy_kept")) - 1) < 1e-9)
    }

    @Test("an all-zero update leaves no slot zero in both factors")
    func zeroUpdateStaysTrainable() throws {
        var generator = TestSupport.SeededGenerator(seed: 62)
        var clients = [TestSupport.randomClient("a", rank: 3, dOut: 5, dIn: 4, &generator),
                       TestSupport.randomClient("b", rank: 3, dOut: 5, dIn: 4, &generator)]
        for k in clients.indices { clients[k].b = Matrix(zeros: 5, 3) }
        let result = try Self.aggregate(clients, dOut: 5, dIn: 4, ["rank=6"])
        #expect(result.b.values.allSatisfy { $0 == 0 })
        for slot in 0..<6 { #expect((0..<4).contains { result.a[slot, $0] != 0 }, "A row \(slot)") }
        #expect(try #require(result.diagnostic("energy_kept")) == 1)
    }
}
