import Testing
import LoraAggCore
import LoraAggHost

@Suite("replication-pad")
struct ReplicationPadTests {
    @Test("a hand-derived case with ranks 1 and 2: the slot owned by one client is not diluted")
    func handDerived() throws {
        // Same clients as the zero-pad hand case (samples 1:3). Slot 0 is shared,
        // so it matches zero-pad; slot 1 belongs to 'high' alone, whose weight
        // renormalises to 1: Ā[1] = [2, 4], B̄[:,1] = [0, 1, −2].
        let result = try PaddedFactors.aggregate("replication-pad", ZeroPadTests.handClients, dOut: 3, dIn: 2)
        #expect(result.a == Matrix(rows: 2, cols: 2, values: [2.5, -0.25, 2, 4]))
        #expect(result.b == Matrix(rows: 3, cols: 2, values: [1.75, 0, 1.5, 1, 1.25, -2]))
        #expect(result.scaling == 2)
        #expect(result.diagnostic("single_owner_slots") == 1)
    }

    @Test("random ranks 1, 2, 3 match the per-slot renormalised means computed in Double")
    func renormalisedMeans() throws {
        var generator = TestSupport.SeededGenerator(seed: 17)
        let ranks = [1, 3, 2], samples: [Double] = [1, 2, 5]
        let clients = ranks.indices.map {
            TestSupport.randomClient("c\($0)", rank: ranks[$0], dOut: 7, dIn: 4, samples: samples[$0], &generator)
        }
        let result = try PaddedFactors.aggregate("replication-pad", clients, dOut: 7, dIn: 4)
        // Owners' sample totals per slot: {all} 8, {c1, c2} 7, {c1} 2.
        let ownerTotals: [Double] = [8, 7, 2]
        let expected = PaddedFactors.paddedSums(clients, rank: 3, dOut: 7, dIn: 4) { k, slot in samples[k] / ownerTotals[slot] }
        #expect(PaddedFactors.maxDifference(result.a, expected.a) < PaddedFactors.tolerance)
        #expect(PaddedFactors.maxDifference(result.b, expected.b) < PaddedFactors.tolerance)
    }

    @Test("with equal ranks replication-pad equals zero-pad and FedIT, bit for bit")
    func equalRanksEqualsZeroPad() throws {
        var generator = TestSupport.SeededGenerator(seed: 19)
        let clients = (0..<5).map {
            TestSupport.randomClient("c\($0)", rank: 4, dOut: 9, dIn: 6, samples: Double(7 * $0 + 1), scaling: $0 == 2 ? 4 : 2, &generator)
        }
        let replication = try PaddedFactors.aggregate("replication-pad", clients, dOut: 9, dIn: 6)
        let zeroPad = try PaddedFactors.aggregate("zero-pad", clients, dOut: 9, dIn: 6)
        let fedIT = try PaddedFactors.aggregate("fedit", clients, dOut: 9, dIn: 6)
        #expect(replication.a == zeroPad.a && replication.b == zeroPad.b && replication.scaling == zeroPad.scaling)
        #expect(replication.a == fedIT.a && replication.b == fedIT.b)
    }

    @Test("with mixed ranks it differs from zero-pad exactly on the slots a subset owns, and there is the renormalised mean")
    func differsOnSubsetSlots() throws {
        var generator = TestSupport.SeededGenerator(seed: 29)
        let ranks = [2, 4, 4], samples: [Double] = [6, 3, 1]
        let clients = ranks.indices.map {
            TestSupport.randomClient("c\($0)", rank: ranks[$0], dOut: 10, dIn: 7, samples: samples[$0], &generator)
        }
        let replication = try PaddedFactors.aggregate("replication-pad", clients, dOut: 10, dIn: 7)
        let zeroPad = try PaddedFactors.aggregate("zero-pad", clients, dOut: 10, dIn: 7)
        for slot in 0..<4 {
            let rowsEqual = (0..<7).allSatisfy { replication.a[slot, $0] == zeroPad.a[slot, $0] }
            let columnsEqual = (0..<10).allSatisfy { replication.b[$0, slot] == zeroPad.b[$0, slot] }
            // Slots 0–1 belong to everyone: identical. Slots 2–3 belong to c1 and c2 only: different everywhere.
            #expect(rowsEqual == (slot < 2))
            #expect(columnsEqual == (slot < 2))
            if slot >= 2 {
                #expect((0..<7).allSatisfy { replication.a[slot, $0] != zeroPad.a[slot, $0] })
            }
        }
        let expected = PaddedFactors.paddedSums(clients, rank: 4, dOut: 10, dIn: 7) { k, slot in
            slot < 2 ? samples[k] / 10 : samples[k] / 4
        }
        #expect(PaddedFactors.maxDifference(replication.a, expected.a) < PaddedFactors.tolerance)
        #expect(PaddedFactors.maxDifference(replication.b, expected.b) < PaddedFactors.tolerance)
        // Zero-pad is the same sums shrunk by the owners' weight 4/10 on slots 2–3.
        let shrunk = PaddedFactors.paddedSums(clients, rank: 4, dOut: 10, dIn: 7) { k, _ in samples[k] / 10 }
        #expect(PaddedFactors.maxDifference(zeroPad.a, shrunk.a) < PaddedFactors.tolerance)
    }

    @Test("a lone high-rank client's extra slots enter the global adapter undiluted")
    func loneHighRankClient() throws {
        var generator = TestSupport.SeededGenerator(seed: 31)
        let ranks = [2, 2, 2, 8]
        let clients = ranks.indices.map { TestSupport.randomClient("c\($0)", rank: ranks[$0], dOut: 5, dIn: 6, &generator) }
        let result = try PaddedFactors.aggregate("replication-pad", clients, dOut: 5, dIn: 6)
        for slot in 2..<8 {
            #expect((0..<6).allSatisfy { result.a[slot, $0] == clients[3].a[slot, $0] })
            #expect((0..<5).allSatisfy { result.b[$0, slot] == clients[3].b[$0, slot] })
        }
        #expect(result.diagnostic("single_owner_slots") == 6)
    }

    @Test("two clients applying the same update at scalings α/r and α/√r aggregate to exactly that update")
    func sameUpdateDifferentScalings() throws {
        var generator = TestSupport.SeededGenerator(seed: 37)
        let base = TestSupport.randomClient("base", rank: 4, dOut: 5, dIn: 3, &generator)
        let half = Float(0.5).squareRoot()
        let plain = ClientUpdate(id: "plain", samples: 2, scaling: PaddedFactors.peftScaling(alpha: 8, rank: 4, rsLoRA: false),
                                 a: base.a, b: base.b)
        let rs = ClientUpdate(id: "rslora", samples: 3, scaling: PaddedFactors.peftScaling(alpha: 8, rank: 4, rsLoRA: true),
                              a: Matrix(rows: 4, cols: 3, values: base.a.values.map { $0 * half }),
                              b: Matrix(rows: 5, cols: 4, values: base.b.values.map { $0 * half }))
        let result = try PaddedFactors.aggregate("replication-pad", [plain, rs], dOut: 5, dIn: 3)
        #expect(abs(result.scaling - (0.4 * 2 + 0.6 * 4)) < 1e-12)
        let update = ModuleRound.withRound(module: "m", dOut: 5, dIn: 3, clients: [plain]) { Reference.idealUpdate($0) }
        #expect(Reference.relativeError(Reference.effectiveUpdate(result, dOut: 5, dIn: 3), update) < 1e-5)
    }

    @Test("mixed ranks and mixed scalings: slot i is Σ_{owners} n_k √(s_k/s) factor / Σ_{owners} n_k")
    func mixedRanksAndScalings() throws {
        var generator = TestSupport.SeededGenerator(seed: 41)
        // α/r with r = 2, α = 16 gives 8; rsLoRA α/√r with r = 4, α = 32 gives 16. Equal samples: s = 12.
        let scalings = [PaddedFactors.peftScaling(alpha: 16, rank: 2, rsLoRA: false),
                        PaddedFactors.peftScaling(alpha: 32, rank: 4, rsLoRA: true)]
        let clients = [
            TestSupport.randomClient("c0", rank: 2, dOut: 6, dIn: 4, samples: 1, scaling: scalings[0], &generator),
            TestSupport.randomClient("c1", rank: 4, dOut: 6, dIn: 4, samples: 1, scaling: scalings[1], &generator),
        ]
        let rescale = [(8.0 / 12).squareRoot(), (16.0 / 12).squareRoot()]
        let result = try PaddedFactors.aggregate("replication-pad", clients, dOut: 6, dIn: 4)
        #expect(result.scaling == 12)
        let expected = PaddedFactors.paddedSums(clients, rank: 4, dOut: 6, dIn: 4) { k, slot in
            (slot < 2 ? 0.5 : 1) * rescale[k]
        }
        #expect(PaddedFactors.maxDifference(result.a, expected.a) < PaddedFactors.tolerance)
        #expect(PaddedFactors.maxDifference(result.b, expected.b) < PaddedFactors.tolerance)
    }

    @Test("a slot whose owners all have zero samples is zero")
    func ownerlessSlotIsZero() throws {
        var generator = TestSupport.SeededGenerator(seed: 43)
        var clients = [TestSupport.randomClient("small", rank: 1, dOut: 3, dIn: 2, &generator),
                       TestSupport.randomClient("idle", rank: 3, dOut: 3, dIn: 2, &generator)]
        clients[1].samples = 0
        let result = try PaddedFactors.aggregate("replication-pad", clients, dOut: 3, dIn: 2)
        #expect(result.a.values[0..<2].elementsEqual(clients[0].a.values))
        #expect(result.a.values[2...].allSatisfy { $0 == 0 })
        #expect((0..<3).allSatisfy { result.b[$0, 1] == 0 && result.b[$0, 2] == 0 })
    }
}
