import Testing
import LoraAggCore
import LoraAggHost

/// Matrices over storage blocks (written in place by a strategy, or borrowed
/// from a plugin's result) must behave exactly like array-backed ones.
@Suite("matrix storage blocks")
struct MatrixStorageTests {
    /// A 2x3 matrix written through `initializingWith:`, entries 10·i + j.
    func written() -> Matrix {
        Matrix(rows: 2, cols: 3, initializingWith: { buffer in
            for i in 0..<2 { for j in 0..<3 { buffer[i * 3 + j] = Float(10 * i + j) } }
        })
    }

    @Test("a matrix written in place reads back the same through values, subscripts, views and equality")
    func reads() {
        let matrix = written()
        let expected: [Float] = [0, 1, 2, 10, 11, 12]
        #expect(matrix.values == expected)
        #expect(matrix[1, 2] == 12 && matrix[0, 1] == 1)
        #expect(matrix.withView { view in (0..<6).map { view.base[$0] } } == expected)
        #expect(matrix == Matrix(rows: 2, cols: 3, values: expected))
        #expect(matrix != Matrix(rows: 3, cols: 2, values: expected))
        #expect(matrix != Matrix(rows: 2, cols: 3, values: [0, 1, 2, 10, 11, 13]))
        #expect(matrix.isFinite)
    }

    @Test("mutating a copy of a storage-backed matrix leaves the original unchanged")
    func valueSemantics() {
        let original = written()
        var bySubscript = original
        bySubscript[0, 0] = -1
        var byValues = original
        byValues.values[5] = -5
        var byPointer = original
        byPointer.withUnsafeMutableBufferPointer { $0[3] = -3 }
        #expect(original.values == [0, 1, 2, 10, 11, 12])
        #expect(bySubscript.values == [-1, 1, 2, 10, 11, 12])
        #expect(byValues.values == [0, 1, 2, 10, 11, -5])
        #expect(byPointer.values == [0, 1, 2, -3, 11, 12])
        #expect(byPointer[1, 0] == -3)
    }

    @Test("a uniquely held storage block is written in place, and values read afterwards see the write")
    func inPlace() {
        var matrix = written()
        _ = matrix.values  // caches an array copy, which the write must not leave stale
        matrix.withUnsafeMutableBufferPointer { $0[0] = 7 }
        #expect(matrix.values == [7, 1, 2, 10, 11, 12])
        #expect(matrix[0, 0] == 7)
    }

    @Test("a plugin's result stays readable after its aggregator is gone, and equals a second run's")
    func borrowedResults() throws {
        var generator = TestSupport.SeededGenerator(seed: 5)
        let clients = (0..<3).map { TestSupport.randomClient("c\($0)", rank: 2, dOut: 6, dIn: 4, samples: Double(1 + $0), &generator) }
        func run() throws -> AggregationResult {
            let aggregator = try TestSupport.registry.plugin(named: "fedex-lora").makeAggregator()
            return try ModuleRound.withRound(module: "m", dOut: 6, dIn: 4, clients: clients) { try aggregator.aggregate($0) }
        }
        let first = try run(), second = try run()
        let residual = try #require(first.residual)
        // The effective update s·B·A + U·V is the ideal update whether or not the aggregator still exists.
        let ideal = ModuleRound.withRound(module: "m", dOut: 6, dIn: 4, clients: clients) { Reference.idealUpdate($0) }
        let effective = Reference.effectiveUpdate(first, dOut: 6, dIn: 4)
        #expect(Reference.relativeError(effective, ideal) < 1e-5)
        #expect(first.a == second.a && first.b == second.b && residual.u == second.residual?.u && residual.v == second.residual?.v)
        var copy = residual.u
        copy[0, 0] += 1
        #expect(copy != residual.u)
    }
}
