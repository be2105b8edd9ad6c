import Testing
import LoraAggCore

@Suite("slot-weighted kernels")
struct SlotKernelTests {
    /// Ranks that exercise full 8-slot blocks, half blocks and odd remainders.
    static let ranks = [5, 12, 3, 8, 17, 1]

    static func factors(_ generator: inout TestSupport.SeededGenerator) -> [ClientUpdate] {
        ranks.indices.map { TestSupport.randomClient("c\($0)", rank: ranks[$0], dOut: 11, dIn: 7, &generator) }
    }

    /// Lends one factor of every client as views for the duration of `body`.
    static func withViews<R>(_ clients: [ClientUpdate], _ factor: KeyPath<ClientFactors, MatrixView>,
                             _ body: ([MatrixView]) -> R) -> R {
        ModuleRound.withRound(module: "m", dOut: 11, dIn: 7, clients: clients) { body($0.clients.map { $0[keyPath: factor] }) }
    }

    @Test("slotWeightedColumnSum matches per-slot sums in Double and paddedColumnSum bit for bit with per-client weights")
    func columnSum() throws {
        var generator = TestSupport.SeededGenerator(seed: 71)
        let clients = Self.factors(&generator)
        let slotWeights = clients.indices.map { k in (0..<clients[k].rank).map { 0.1 * Double(k + 1) + 0.01 * Double($0) } }
        let result = Self.withViews(clients, \.b) { Kernels.slotWeightedColumnSum($0, slotWeights: slotWeights, cols: 17) }
        let expected = PaddedFactors.paddedSums(clients, rank: 17, dOut: 11, dIn: 7) { k, slot in slotWeights[k][slot] }
        #expect(PaddedFactors.maxDifference(result, expected.b) < PaddedFactors.tolerance)
        let constant = clients.indices.map { k in [Double](repeating: 0.3 + 0.1 * Double(k), count: clients[k].rank) }
        let fast = Self.withViews(clients, \.b) { Kernels.slotWeightedColumnSum($0, slotWeights: constant, cols: 17) }
        let plain = Self.withViews(clients, \.b) { Kernels.paddedColumnSum($0, weights: constant.map { $0[0] }, cols: 17) }
        #expect(fast == plain)
    }

    @Test("slotWeightedRowSum matches per-slot sums in Double and paddedRowSum bit for bit with per-client weights")
    func rowSum() throws {
        var generator = TestSupport.SeededGenerator(seed: 73)
        let clients = Self.factors(&generator)
        let slotWeights = clients.indices.map { k in (0..<clients[k].rank).map { 0.2 * Double(k + 1) - 0.03 * Double($0) } }
        let result = Self.withViews(clients, \.a) { Kernels.slotWeightedRowSum($0, slotWeights: slotWeights, rows: 17) }
        let expected = PaddedFactors.paddedSums(clients, rank: 17, dOut: 11, dIn: 7) { k, slot in slotWeights[k][slot] }
        #expect(PaddedFactors.maxDifference(result, expected.a) < PaddedFactors.tolerance)
        let constant = clients.indices.map { k in [Double](repeating: 0.5 - 0.05 * Double(k), count: clients[k].rank) }
        let fast = Self.withViews(clients, \.a) { Kernels.slotWeightedRowSum($0, slotWeights: constant, rows: 17) }
        let plain = Self.withViews(clients, \.a) { Kernels.paddedRowSum($0, weights: constant.map { $0[0] }, rows: 17) }
        #expect(fast == plain)
    }

    @Test("productFrobeniusNorm equals ‖B·A‖_F formed densely, on non-square shapes")
    func productNorm() throws {
        var generator = TestSupport.SeededGenerator(seed: 79)
        for rank in [1, 3, 16] {
            let client = TestSupport.randomClient("c", rank: rank, dOut: 13, dIn: 29, &generator)
            let norm = client.b.withView { b in client.a.withView { a in Kernels.productFrobeniusNorm(b: b, a: a) } }
            let dense = PaddedFactors.denseProductNorm(client)
            #expect(abs(norm - dense) <= 1e-5 * dense)
        }
    }

    @Test("allWithin fails on NaN and on a difference above the tolerance")
    func allWithin() throws {
        let x: [Float] = [1, 2, 3, 4], close: [Float] = [1, 2, 3.000001, 4], far: [Float] = [1, 2.1, 3, 4], nan: [Float] = [1, .nan, 3, 4]
        #expect(Kernels.allWithin(x, close, count: 4, tolerance: 1e-5))
        #expect(!Kernels.allWithin(x, far, count: 4, tolerance: 1e-5))
        #expect(!Kernels.allWithin(x, nan, count: 4, tolerance: 1e-5))
        #expect(Kernels.maxMagnitude([-3, 2], count: 2) == 3)
        #expect(Kernels.maxMagnitude(nan, count: 4).isNaN)
        // Long enough for the 16-lane loop and a scalar tail, with the odd entry in either part.
        let long = (0..<5000).map { Float($0 % 13) - 6 }
        #expect(Kernels.allWithin(long, long, count: 5000, tolerance: 0))
        #expect(Kernels.maxMagnitude(long, count: 5000) == 6)
        for position in [0, 37, 4099, 4999] {
            var changed = long
            changed[position] += 1e-3
            #expect(!Kernels.allWithin(long, changed, count: 5000, tolerance: 1e-4))
            #expect(Kernels.allWithin(long, changed, count: 5000, tolerance: 1e-2))
            changed[position] = .nan
            #expect(!Kernels.allWithin(long, changed, count: 5000, tolerance: 1e-2))
            #expect(Kernels.maxMagnitude(changed, count: 5000).isNaN)
            changed[position] = -70
            #expect(Kernels.maxMagnitude(changed, count: 5000) == 70)
        }
    }
}
