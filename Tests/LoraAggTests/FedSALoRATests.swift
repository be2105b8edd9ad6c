import Testing
import LoraAggCore
import LoraAggHost

@Suite("fedsa-lora")
struct FedSALoRATests {
    static func aggregate(_ clients: [ClientUpdate], dOut: Int, dIn: Int) throws -> AggregationResult {
        let aggregator = try TestSupport.registry.plugin(named: "fedsa-lora").makeAggregator()
        return try ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    @Test("every client gets the shared Ā with its own B and scaling back, bit for bit")
    func eachClientKeepsItsB() throws {
        var generator = TestSupport.SeededGenerator(seed: 51)
        let (dOut, dIn) = (5, 3)
        let clients = [
            TestSupport.randomClient("x", rank: 2, dOut: dOut, dIn: dIn, samples: 10, scaling: 16.0 / 2, &generator),
            TestSupport.randomClient("y", rank: 2, dOut: dOut, dIn: dIn, samples: 30, scaling: 16.0 / 2.0.squareRoot(), &generator),
            TestSupport.randomClient("z", rank: 2, dOut: dOut, dIn: dIn, samples: 60, scaling: 2, &generator),
        ]
        let result = try Self.aggregate(clients, dOut: dOut, dIn: dIn)
        let payloads = try #require(result.clientPayloads)
        #expect(payloads.count == 3)
        for (k, client) in clients.enumerated() {
            #expect(payloads[k].b == client.b, "client \(client.id) gets its own B")
            #expect(payloads[k].scaling == client.scaling)
            #expect(payloads[k].a == result.a)
        }
        #expect(payloads[0].b != payloads[1].b, "B is not shared between clients")
        // Ā = 0.1 A_x + 0.3 A_y + 0.6 A_z, untouched by the scalings.
        for i in 0..<2 { for j in 0..<dIn {
            let expected = 0.1 * Double(clients[0].a[i, j]) + 0.3 * Double(clients[1].a[i, j]) + 0.6 * Double(clients[2].a[i, j])
            #expect(abs(Double(result.a[i, j]) - expected) < 1e-6)
        } }
        // Client k's update is s_k B_k Ā: its own factor with the shared one.
        let expected = clients[1].b.withView { b in result.a.withView { a in
            var total = [Double](repeating: 0, count: dOut * dIn)
            Reference.accumulateProduct(b: b, a: a, weight: clients[1].scaling, into: &total, dIn: dIn)
            return total
        } }
        #expect(Reference.relativeError(Reference.clientUpdate(result, client: 1, rank: 2, dOut: dOut, dIn: dIn), expected) < 1e-7)
    }

    @Test("the reported global B̄ folds s_k/s into B, computed by hand")
    func globalMeanB() throws {
        // p = (0.5, 0.5), s = (4, 1): s = 2.5; B̄ = 0.5·1.6·B_0 + 0.5·0.4·B_1.
        let clients = [
            ClientUpdate(id: "p", samples: 2, scaling: 4, a: Matrix(rows: 1, cols: 2, values: [1, 3]),
                         b: Matrix(rows: 3, cols: 1, values: [1, 2, 3])),
            ClientUpdate(id: "q", samples: 2, scaling: 1, a: Matrix(rows: 1, cols: 2, values: [3, 1]),
                         b: Matrix(rows: 3, cols: 1, values: [10, 0, -5])),
        ]
        let result = try Self.aggregate(clients, dOut: 3, dIn: 2)
        #expect(abs(result.scaling - 2.5) < 1e-12)
        #expect(zip(result.a.values, [2, 2]).allSatisfy { abs($0 - $1) < 1e-6 })
        #expect(zip(result.b.values, [2.8, 1.6, 1.4]).allSatisfy { abs($0 - $1) < 1e-6 })
    }

    @Test("clients of different ranks are refused")
    func refusesMixedRanks() throws {
        var generator = TestSupport.SeededGenerator(seed: 52)
        let clients = [TestSupport.randomClient("two", rank: 2, dOut: 4, dIn: 3, &generator),
                       TestSupport.randomClient("four", rank: 4, dOut: 4, dIn: 3, &generator)]
        let error = #expect(throws: AggregationError.self) { try Self.aggregate(clients, dOut: 4, dIn: 3) }
        #expect(error?.message.contains("'four' r=4") == true)
    }
}
