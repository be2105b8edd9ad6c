import Testing
import LoraAggCore
import LoraAggHost

@Suite("fedit")
struct FedITTests {
    @Test("A and B are the sample-weighted means, computed independently, on a non-square module")
    func weightedMeans() throws {
        var generator = TestSupport.SeededGenerator(seed: 7)
        let clients = [
            TestSupport.randomClient("c0", rank: 3, dOut: 5, dIn: 4, samples: 10, &generator),
            TestSupport.randomClient("c1", rank: 3, dOut: 5, dIn: 4, samples: 30, &generator),
        ]
        let aggregator = try TestSupport.registry.plugin(named: "fedit").makeAggregator()
        let result = try ModuleRound.withRound(module: "m", dOut: 5, dIn: 4, clients: clients) { try aggregator.aggregate($0) }
        for i in 0..<3 { for j in 0..<4 {
            let expected = 0.25 * Double(clients[0].a[i, j]) + 0.75 * Double(clients[1].a[i, j])
            #expect(abs(Double(result.a[i, j]) - expected) < 1e-6)
        } }
        for i in 0..<5 { for j in 0..<3 {
            let expected = 0.25 * Double(clients[0].b[i, j]) + 0.75 * Double(clients[1].b[i, j])
            #expect(abs(Double(result.b[i, j]) - expected) < 1e-6)
        } }
        #expect(result.scaling == 2)
    }

    @Test("different scalings are folded in as √(s_k/s) on both factors")
    func mixedScalings() throws {
        // One client with s = 4 and one with s = 1, equal samples: s = 2.5, so
        // the rescales are √1.6 and √0.4, derived here by hand.
        let a0 = Matrix(rows: 1, cols: 2, values: [1, 2]), b0 = Matrix(rows: 3, cols: 1, values: [1, 0, -1])
        let a1 = Matrix(rows: 1, cols: 2, values: [3, -1]), b1 = Matrix(rows: 3, cols: 1, values: [2, 2, 2])
        let clients = [ClientUpdate(id: "x", samples: 1, scaling: 4, a: a0, b: b0),
                       ClientUpdate(id: "y", samples: 1, scaling: 1, a: a1, b: b1)]
        let aggregator = try TestSupport.registry.plugin(named: "fedit").makeAggregator()
        let result = try ModuleRound.withRound(module: "m", dOut: 3, dIn: 2, clients: clients) { try aggregator.aggregate($0) }
        let c0 = (1.6).squareRoot(), c1 = (0.4).squareRoot()
        #expect(abs(result.scaling - 2.5) < 1e-12)
        #expect(abs(Double(result.a[0, 0]) - 0.5 * (c0 * 1 + c1 * 3)) < 1e-6)
        #expect(abs(Double(result.b[2, 0]) - 0.5 * (c0 * -1 + c1 * 2)) < 1e-6)
    }

    @Test("clients of different ranks are refused with an error naming the ranks")
    func refusesMixedRanks() throws {
        var generator = TestSupport.SeededGenerator(seed: 1)
        let clients = [TestSupport.randomClient("small", rank: 2, dOut: 4, dIn: 3, &generator),
                       TestSupport.randomClient("large", rank: 4, dOut: 4, dIn: 3, &generator)]
        let aggregator = try TestSupport.registry.plugin(named: "fedit").makeAggregator()
        let error = #expect(throws: AggregationError.self) {
            try ModuleRound.withRound(module: "q_proj", dOut: 4, dIn: 3, clients: clients) { try aggregator.aggregate($0) }
        }
        #expect(error?.message.contains("'small' r=2") == true)
        #expect(error?.message.contains("'large' r=4") == true)
    }
}
