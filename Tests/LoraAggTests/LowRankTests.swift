import CLoraAggABI
import Testing
import LoraAggCore
import LoraAggHost

@Suite("low-rank kernel")
struct LowRankTests {
    /// Float32 factors and outputs: agreement to a few ulps of Float32 relative to σ_max.
    static let tolerance = 1e-5

    /// Random owned factors for a list of ranks, and their weights.
    static func factors(ranks: [Int], dOut: Int, dIn: Int, seed: UInt64) -> [(b: Matrix, a: Matrix)] {
        var generator = TestSupport.SeededGenerator(seed: seed)
        return ranks.map { r in (TestSupport.randomMatrix(dOut, r, &generator), TestSupport.randomMatrix(r, dIn, &generator)) }
    }

    /// Runs the kernel on owned factors.
    static func run(_ factors: [(b: Matrix, a: Matrix)], weights: [Double], dOut: Int, dIn: Int, keep: Int) throws -> LowRank.Factorization {
        func lend(_ j: Int, _ terms: [LowRank.Term]) throws -> LowRank.Factorization {
            if j == factors.count { return try LowRank.factoredSVD(terms: terms, dOut: dOut, dIn: dIn, keep: keep) }
            return try factors[j].b.withView { b in
                try factors[j].a.withView { a in try lend(j + 1, terms + [LowRank.Term(weight: weights[j], b: b, a: a)]) }
            }
        }
        return try lend(0, [])
    }

    /// Σ w_j B_j A_j in Double, row-major, built entry by entry.
    static func denseSum(_ factors: [(b: Matrix, a: Matrix)], weights: [Double], dOut: Int, dIn: Int) -> [Double] {
        var m = [Double](repeating: 0, count: dOut * dIn)
        for (j, f) in factors.enumerated() {
            for i in 0..<dOut { for c in 0..<dIn { for t in 0..<f.a.rows {
                m[i * dIn + c] += weights[j] * Double(f.b[i, t]) * Double(f.a[t, c])
            } } }
        }
        return m
    }

    /// U_k diag(σ) V_kᵀ of a factorization, row-major.
    static func product(_ svd: LowRank.Factorization, dOut: Int, dIn: Int) -> [Double] {
        var m = [Double](repeating: 0, count: dOut * dIn)
        for t in 0..<svd.sigma.count {
            for i in 0..<dOut { for c in 0..<dIn {
                m[i * dIn + c] += svd.sigma[t] * Double(svd.u[i, t]) * Double(svd.vt[t, c])
            } }
        }
        return m
    }

    /// Largest |⟨x_i, x_j⟩ − δ_ij| over the columns of `u` (given as columns) — 0 for orthonormal.
    static func orthonormalityDefect(_ vectors: [[Double]]) -> Double {
        var worst = 0.0
        for i in vectors.indices { for j in vectors.indices {
            let dot = zip(vectors[i], vectors[j]).reduce(0) { $0 + $1.0 * $1.1 }
            worst = max(worst, abs(dot - (i == j ? 1 : 0)))
        } }
        return worst
    }

    /// Checks σ, the rank-`keep` product and orthonormality against the dense Jacobi SVD.
    @discardableResult
    static func checkAgainstDense(ranks: [Int], weights: [Double], dOut: Int, dIn: Int, keep: Int, seed: UInt64) throws -> LowRank.Factorization {
        try checkAgainstDense(factors(ranks: ranks, dOut: dOut, dIn: dIn, seed: seed), weights: weights, dOut: dOut, dIn: dIn, keep: keep)
    }

    @discardableResult
    static func checkAgainstDense(_ f: [(b: Matrix, a: Matrix)], weights: [Double], dOut: Int, dIn: Int, keep: Int,
                                  nullSlots: Int = 0) throws -> LowRank.Factorization {
        let ranks = f.map(\.a.rows)
        let svd = try run(f, weights: weights, dOut: dOut, dIn: dIn, keep: keep)
        let dense = denseSum(f, weights: weights, dOut: dOut, dIn: dIn)
        let truth = DenseSVD.decompose(dense, rows: dOut, cols: dIn)
        let scale = truth.sigma[0]
        let attainable = min(dOut, dIn, ranks.reduce(0, +) - nullSlots)

        #expect(svd.attainableRank == attainable)
        #expect(svd.spectrum.count == attainable)
        for i in 0..<attainable { #expect(abs(svd.spectrum[i] - truth.sigma[i]) < tolerance * scale, "σ_\(i)") }
        for i in attainable..<truth.sigma.count { #expect(truth.sigma[i] < 1e-9 * scale, "dense σ_\(i) beyond the rank bound") }
        #expect(svd.sigma == Array(svd.spectrum.prefix(keep)))
        #expect(abs(svd.totalEnergy - dense.reduce(0) { $0 + $1 * $1 }) < tolerance * scale * scale)

        // The rank-keep product is unique when σ_keep > σ_keep+1 (true for random data),
        // so it is compared directly; the vectors themselves only up to sign.
        let expected = truth.truncated(keep, rows: dOut, cols: dIn)
        #expect(Reference.relativeError(product(svd, dOut: dOut, dIn: dIn), expected) < tolerance)
        let uColumns = (0..<keep).map { t in (0..<dOut).map { Double(svd.u[$0, t]) } }
        let vRows = (0..<keep).map { t in (0..<dIn).map { Double(svd.vt[t, $0]) } }
        #expect(orthonormalityDefect(uColumns) < tolerance)
        #expect(orthonormalityDefect(vRows) < tolerance)
        for t in 0..<keep {
            let dot = zip(uColumns[t], truth.u[t]).reduce(0) { $0 + $1.0 * $1.1 }
            #expect(abs(abs(dot) - 1) < 1e-4, "u_\(t) equals the dense singular vector up to sign")
        }
        return svd
    }

    /// Two clients whose factors differ by `gap` (relative): the stacks are then
    /// ill-conditioned with κ ≈ 1/gap, as when clients start from one global adapter.
    static func nearDuplicates(gap: Float, dOut: Int, dIn: Int, rank: Int, seed: UInt64) -> [(b: Matrix, a: Matrix)] {
        var generator = TestSupport.SeededGenerator(seed: seed)
        let b = TestSupport.randomMatrix(dOut, rank, &generator), a = TestSupport.randomMatrix(rank, dIn, &generator)
        let db = TestSupport.randomMatrix(dOut, rank, &generator), da = TestSupport.randomMatrix(rank, dIn, &generator)
        let nearB = Matrix(rows: dOut, cols: rank, values: zip(b.values, db.values).map { $0 + gap * $1 })
        let nearA = Matrix(rows: rank, cols: dIn, values: zip(a.values, da.values).map { $0 + gap * $1 })
        return [(b, a), (nearB, nearA)]
    }

    @Test("well-conditioned stacks take one Cholesky QR pass, and it matches the dense SVD")
    func choleskyPath() throws {
        let svd = try Self.checkAgainstDense(ranks: [3, 3, 2], weights: [0.3, 0.5, 40], dOut: 40, dIn: 30, keep: 4, seed: 21)
        #expect(svd.methods.b == .choleskyQR && svd.methods.a == .choleskyQR)
    }

    @Test("moderately ill-conditioned stacks take Cholesky QR twice, and it matches the dense SVD")
    func choleskyTwicePath() throws {
        let f = Self.nearDuplicates(gap: 3e-4, dOut: 40, dIn: 30, rank: 3, seed: 22)
        let svd = try Self.checkAgainstDense(f, weights: [0.5, 0.5], dOut: 40, dIn: 30, keep: 3)
        #expect(svd.methods.b == .choleskyQR2 && svd.methods.a == .choleskyQR2)
    }

    @Test("nearly or exactly dependent stacks fall back to Householder QR, and it matches the dense SVD")
    func householderPath() throws {
        let near = Self.nearDuplicates(gap: 1e-6, dOut: 40, dIn: 30, rank: 3, seed: 23)
        let svd = try Self.checkAgainstDense(near, weights: [0.5, 0.5], dOut: 40, dIn: 30, keep: 3)
        #expect(svd.methods.b == .householder && svd.methods.a == .householder)
        let same = Self.nearDuplicates(gap: 0, dOut: 40, dIn: 30, rank: 3, seed: 24)
        let duplicate = try Self.checkAgainstDense(same, weights: [0.25, 0.75], dOut: 40, dIn: 30, keep: 3)
        #expect(duplicate.methods.b == .householder)
    }

    @Test("slots with a zero B column are dropped before the Gram matrices")
    func untrainedSlots() throws {
        var f = Self.factors(ranks: [4, 2], dOut: 12, dIn: 9, seed: 25)
        for i in 0..<12 { f[0].b[i, 1] = 0; f[0].b[i, 3] = 0 }
        let svd = try Self.checkAgainstDense(f, weights: [1, 2], dOut: 12, dIn: 9, keep: 4, nullSlots: 2)
        #expect(svd.attainableRank == 4)
        #expect(svd.methods.b == .choleskyQR)
    }

    @Test("mixed ranks on a tall module match a dense SVD of the same sum")
    func mixedRanksTall() throws {
        try Self.checkAgainstDense(ranks: [1, 2, 3], weights: [0.5, 1.75, 0.3], dOut: 11, dIn: 8, keep: 3, seed: 11)
    }

    @Test("a wide module with keep below the stacked rank matches a dense SVD")
    func wideKeepBelowStackedRank() throws {
        try Self.checkAgainstDense(ranks: [2, 4], weights: [2.0 / 3, 1.0 / 3 * 4 / 2.0.squareRoot()], dOut: 9, dIn: 13, keep: 4, seed: 12)
    }

    @Test("a stacked rank above min(d_out, d_in) still gives the exact spectrum")
    func stackedRankAboveDimensions() throws {
        // R = 12 > min(7, 5) = 5: the QR factors are trapezoidal.
        try Self.checkAgainstDense(ranks: [4, 4, 4], weights: [0.2, -0.7, 1.3], dOut: 7, dIn: 5, keep: 5, seed: 13)
        try Self.checkAgainstDense(ranks: [6, 3], weights: [1, 1], dOut: 4, dIn: 10, keep: 2, seed: 14)
    }

    @Test("keep above the attainable rank zero-fills the extra slots")
    func keepAboveRank() throws {
        let f = Self.factors(ranks: [2], dOut: 6, dIn: 4, seed: 15)
        let svd = try Self.run(f, weights: [1.5], dOut: 6, dIn: 4, keep: 5)
        #expect(svd.attainableRank == 2)
        #expect(svd.sigma.count == 5 && svd.u.cols == 5 && svd.vt.rows == 5)
        #expect(svd.sigma[0] > 0 && svd.sigma[1] > 0)
        #expect(svd.sigma[2...].allSatisfy { $0 == 0 })
        for t in 2..<5 {
            #expect((0..<6).allSatisfy { svd.u[$0, t] == 0 })
            #expect((0..<4).allSatisfy { svd.vt[t, $0] == 0 })
        }
        let dense = Self.denseSum(f, weights: [1.5], dOut: 6, dIn: 4)
        #expect(Reference.relativeError(Self.product(svd, dOut: 6, dIn: 4), dense) < Self.tolerance)
    }

    @Test("a zero sum gives zero singular values, and weight-0 terms are ignored")
    func zeroMatrix() throws {
        let zeroB = Matrix(zeros: 5, 2)
        var generator = TestSupport.SeededGenerator(seed: 16)
        let a = TestSupport.randomMatrix(2, 3, &generator)
        let zero = try Self.run([(zeroB, a)], weights: [1], dOut: 5, dIn: 3, keep: 2)
        #expect(zero.sigma == [0, 0] && zero.totalEnergy == 0)
        #expect(zero.relativeTruncationError(rank: 1) == 0)

        let f = Self.factors(ranks: [3], dOut: 5, dIn: 3, seed: 17)
        let ignored = try Self.run(f, weights: [0], dOut: 5, dIn: 3, keep: 2)
        #expect(ignored.attainableRank == 0 && ignored.spectrum.isEmpty)
        #expect(ignored.sigma == [0, 0] && ignored.u.values.allSatisfy { $0 == 0 })

        let none = try LowRank.factoredSVD(terms: [], dOut: 5, dIn: 3, keep: 1)
        #expect(none.sigma == [0] && none.vt.values.allSatisfy { $0 == 0 })
    }

    @Test("truncation energies sum the spectrum's head and tail")
    func energies() throws {
        let f = Self.factors(ranks: [3, 2], dOut: 8, dIn: 6, seed: 18)
        let svd = try Self.run(f, weights: [0.4, 0.6], dOut: 8, dIn: 6, keep: 2)
        let dense = Self.denseSum(f, weights: [0.4, 0.6], dOut: 8, dIn: 6)
        let truth = DenseSVD.decompose(dense, rows: 8, cols: 6)
        let lost = Reference.relativeError(truth.truncated(2, rows: 8, cols: 6), dense)
        #expect(abs(svd.relativeTruncationError(rank: 2) - lost) < 1e-6)
        #expect(abs(svd.energy(first: 2) + svd.tailEnergy(after: 2) - svd.totalEnergy) < 1e-9 * svd.totalEnergy)
        #expect(svd.relativeTruncationError(rank: 5) < 1e-6)
    }

    @Test("factors that do not fit the module are refused with the term and shapes named")
    func shapeMismatch() throws {
        let f = Self.factors(ranks: [2], dOut: 5, dIn: 4, seed: 19)
        let error = #expect(throws: AggregationError.self) {
            _ = try Self.run(f, weights: [1], dOut: 5, dIn: 3, keep: 1)
        }
        #expect(error?.message.contains("term 0 is (5x2)·(2x4)") == true)
    }

    @Test("NaN or infinity in a factor is invalid input naming the term, never a dropped slot")
    func nonFinite() throws {
        for bad in [Float.nan, .infinity] {
            var f = Self.factors(ranks: [2, 3], dOut: 6, dIn: 5, seed: 26)
            f[1].a[2, 4] = bad
            let error = #expect(throws: AggregationError.self) { _ = try Self.run(f, weights: [1, 1], dOut: 6, dIn: 5, keep: 2) }
            #expect(error == .invalidInput("factored SVD: term 1: A contains NaN or infinite values"))
            // A weight-0 term before it does not shift the index.
            f = Self.factors(ranks: [2, 3], dOut: 6, dIn: 5, seed: 27)
            f[1].b[0, 0] = bad
            let shifted = #expect(throws: AggregationError.self) {
                _ = try Self.run([f[0]] + f, weights: [0, 1, 1], dOut: 6, dIn: 5, keep: 2)
            }
            #expect(shifted == .invalidInput("factored SVD: term 2: B contains NaN or infinite values"))
        }
    }

    @Test("the host's factored_svd C service returns the kernel's triplets")
    func hostService() throws {
        let ranks = [3, 1]
        let f = Self.factors(ranks: ranks, dOut: 6, dIn: 9, seed: 20)
        let weights = [0.25, 3.0]
        let expected = try Self.run(f, weights: weights, dOut: 6, dIn: 9, keep: 2)
        let api = PluginLoader.hostServices.pointee
        var u = [Float](repeating: .nan, count: 12), sigma = [Float](repeating: .nan, count: 2)
        var vt = [Float](repeating: .nan, count: 18), message = [CChar](repeating: 0, count: 256)
        let rankList = ranks.map { UInt32($0) }
        let status = f[0].b.values.withUnsafeBufferPointer { b0 in f[1].b.values.withUnsafeBufferPointer { b1 in
            f[0].a.values.withUnsafeBufferPointer { a0 in f[1].a.values.withUnsafeBufferPointer { a1 in
                let bs = [b0.baseAddress!, b1.baseAddress!], as_ = [a0.baseAddress!, a1.baseAddress!]
                return api.factored_svd(2, weights, rankList, bs, as_, 6, 9, 2, &u, &sigma, &vt, &message, message.count)
            } }
        } }
        #expect(status == LORA_AGG_OK)
        #expect(u == expected.u.values && vt == expected.vt.values)
        #expect(sigma == expected.sigma.map { Float($0) })

        // Keeping nothing is valid; an empty module is reported with a message, not crashed on.
        let nothing = f[0].b.values.withUnsafeBufferPointer { b0 in f[0].a.values.withUnsafeBufferPointer { a0 in
            api.factored_svd(1, weights, rankList, [b0.baseAddress!], [a0.baseAddress!], 6, 9, 0, &u, &sigma, &vt, &message, message.count)
        } }
        #expect(nothing == LORA_AGG_OK)
        let wrongShape = f[0].b.values.withUnsafeBufferPointer { b0 in f[0].a.values.withUnsafeBufferPointer { a0 in
            api.factored_svd(1, weights, rankList, [b0.baseAddress!], [a0.baseAddress!], 6, 0, 1, &u, &sigma, &vt, &message, message.count)
        } }
        #expect(wrongShape == LORA_AGG_INVALID_INPUT)
        let text = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        #expect(text.contains("factored SVD"))
    }
}
