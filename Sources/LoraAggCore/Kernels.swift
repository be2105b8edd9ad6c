import COpenBLAS

/// Memory-bound kernels shared by the factor-averaging strategies.
///
/// Written by hand because no BLAS routine takes a list of separately
/// allocated inputs (`sgemv` needs the clients stacked in one buffer, which
/// would cost a copy of the whole round), and `saxpy` per client would read
/// and write the accumulator K times; this kernel reads every input byte once
/// and writes every output byte once (see docs/performance.md).
public enum Kernels {
    /// `destination[i] = Σ_k weights[k] · sources[k][i]` for `i < count`.
    /// An empty `sources` writes zeros.
    ///
    /// Sixteen lanes at a time, the sum over clients is kept in a register and
    /// stored once, so every input byte is read once and every output byte
    /// written once; K input streams is well within what the prefetchers follow.
    public static func weightedSum(_ sources: [UnsafePointer<Float>], weights: [Float], count: Int,
                                   into destination: UnsafeMutablePointer<Float>) {
        precondition(sources.count == weights.count, "one weight per source")
        if sources.isEmpty {
            destination.update(repeating: 0, count: count)
            return
        }
        typealias Lanes = SIMD16<Float>
        let blocks = count / Lanes.scalarCount
        sources.withUnsafeBufferPointer { inputs in
            weights.withUnsafeBufferPointer { w in
                let output = UnsafeMutableRawPointer(destination)
                var block = 0
                while block < blocks {
                    let offset = block &* MemoryLayout<Lanes>.stride
                    var sum = Lanes(repeating: w[0]) * UnsafeRawPointer(inputs[0]).loadUnaligned(fromByteOffset: offset, as: Lanes.self)
                    var k = 1
                    while k < inputs.count {
                        sum += Lanes(repeating: w[k]) * UnsafeRawPointer(inputs[k]).loadUnaligned(fromByteOffset: offset, as: Lanes.self)
                        k &+= 1
                    }
                    output.storeBytes(of: sum, toByteOffset: offset, as: Lanes.self)
                    block &+= 1
                }
                var i = blocks &* Lanes.scalarCount
                while i < count {
                    var sum = w[0] * inputs[0][i]
                    for k in 1..<inputs.count { sum += w[k] * inputs[k][i] }
                    destination[i] = sum
                    i &+= 1
                }
            }
        }
    }

    /// Whether every value is finite, sixteen lanes at a time: x·0 is 0 for a
    /// finite x and NaN for ±inf or NaN, and NaN survives the sum.
    public static func allFinite(_ values: UnsafeBufferPointer<Float>) -> Bool {
        guard let base = values.baseAddress else { return true }
        typealias Lanes = SIMD16<Float>
        let raw = UnsafeRawPointer(base)
        var probe = Lanes(repeating: 0)
        let blocks = values.count / Lanes.scalarCount
        var block = 0
        while block < blocks {
            probe += raw.loadUnaligned(fromByteOffset: block &* MemoryLayout<Lanes>.stride, as: Lanes.self) * 0
            block &+= 1
        }
        var tail: Float = 0
        for i in (blocks &* Lanes.scalarCount)..<values.count { tail += values[i] * 0 }
        return probe.sum() == 0 && tail == 0
    }

    /// An uninitialised Float array filled by `body` (skips zeroing memory that is overwritten anyway).
    public static func makeArray(count: Int, _ body: (UnsafeMutablePointer<Float>) -> Void) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if let base = buffer.baseAddress { body(base) }
            initialized = count
        }
    }

    /// Weighted sum of whole matrices of one shape into a new matrix.
    public static func weightedSum(_ sources: [MatrixView], weights: [Double]) -> Matrix {
        let rows = sources.first?.rows ?? 0, cols = sources.first?.cols ?? 0
        precondition(sources.allSatisfy { $0.rows == rows && $0.cols == cols }, "weightedSum needs matrices of one shape")
        let values = makeArray(count: rows * cols) { base in
            weightedSum(sources.map(\.base), weights: weights.map { Float($0) }, count: rows * cols, into: base)
        }
        return Matrix(rows: rows, cols: cols, values: values)
    }

    /// Zero-padded weighted sum of A factors of different ranks:
    /// row i of the rows×cols result is Σ_{k: rank_k > i} w_k A_k[i, :].
    /// Rows are contiguous, so each client is one contiguous prefix.
    public static func paddedRowSum(_ sources: [MatrixView], weights: [Double], rows: Int) -> Matrix {
        let cols = sources.first?.cols ?? 0
        var result = Matrix(zeros: rows, cols)
        result.values.withUnsafeMutableBufferPointer { out in
            guard let base = out.baseAddress else { return }
            // Rows owned by the same set of clients form one contiguous band.
            let bounds = Array(Set(sources.map { Swift.min($0.rows, rows) } + [0])).sorted()
            for (lower, upper) in zip(bounds, bounds.dropFirst()) {
                let owners = sources.indices.filter { sources[$0].rows >= upper }
                weightedSum(owners.map { sources[$0].base + lower * cols },
                            weights: owners.map { Float(weights[$0]) },
                            count: (upper - lower) * cols, into: base + lower * cols)
            }
        }
        return result
    }

    /// Zero-padded weighted sum of B factors of different ranks:
    /// column j of the result (rows × cols) is Σ_{k: rank_k > j} w_k B_k[:, j].
    public static func paddedColumnSum(_ sources: [MatrixView], weights: [Double], cols: Int) -> Matrix {
        let rows = sources.first?.rows ?? 0
        if sources.allSatisfy({ $0.cols == cols }) { return weightedSum(sources, weights: weights) }
        var result = Matrix(zeros: rows, cols)
        result.values.withUnsafeMutableBufferPointer { out in
            guard let base = out.baseAddress else { return }
            for (k, source) in sources.enumerated() {
                let w = Float(weights[k]), width = Swift.min(source.cols, cols)
                for i in 0..<rows {
                    let x = source.base + i &* source.cols
                    let o = base + i &* cols
                    for j in 0..<width { o[j] += w * x[j] }
                }
            }
        }
        return result
    }

    /// C (m×n) = αAB + βC in Float, row-major, through OpenBLAS.
    public static func gemm(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
                            m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false,
                            alpha: Float = 1, beta: Float = 0) {
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(transposeA ? m : k),
                    b, Int32(transposeB ? k : n), beta, c, Int32(n))
    }

    /// C (m×n) = αAB + βC in Double, row-major, through OpenBLAS.
    public static func gemm(_ a: UnsafePointer<Double>, _ b: UnsafePointer<Double>, _ c: UnsafeMutablePointer<Double>,
                            m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false,
                            alpha: Double = 1, beta: Double = 0) {
        cblas_dgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(transposeA ? m : k),
                    b, Int32(transposeB ? k : n), beta, c, Int32(n))
    }
}

// MARK: - Per-slot weights and factored norms (added for zero-pad, replication-pad, ffa-lora)

extension Kernels {
    /// Weighted sum of A factors of different ranks with one weight per client
    /// and rank slot: row i of the rows×cols result is
    /// Σ_{k: rank_k > i} slotWeights[k][i] · A_k[i, :].
    ///
    /// `slotWeights[k]` needs at least min(rank_k, rows) entries. Consecutive
    /// rows whose owners and weights agree are summed as one band, so a round
    /// of equal ranks and per-client weights is a single ``weightedSum`` call
    /// and every input byte is read once.
    public static func slotWeightedRowSum(_ sources: [MatrixView], slotWeights: [[Double]], rows: Int) -> Matrix {
        precondition(sources.count == slotWeights.count, "one weight list per source")
        let cols = sources.first?.cols ?? 0
        precondition(sources.allSatisfy { $0.cols == cols }, "slotWeightedRowSum needs sources of one width")
        // Every row below the largest rank has an owner and is written by
        // weightedSum, so the result needs no zero fill first.
        let owned = Swift.min(rows, sources.map(\.rows).max() ?? 0)
        let values = makeArray(count: rows &* cols) { base in
            (base + owned &* cols).update(repeating: 0, count: (rows &- owned) &* cols)
            guard cols > 0 else { return }
            /// The (owner, weight) pairs of row i, as Float weights the kernel uses.
            func band(_ i: Int) -> [(Int, Float)] {
                sources.indices.compactMap { k in sources[k].rows > i ? (k, Float(slotWeights[k][i])) : nil }
            }
            var lower = 0
            while lower < owned {
                let owners = band(lower)
                var upper = lower + 1
                while upper < owned, band(upper).elementsEqual(owners, by: { $0 == $1 }) { upper += 1 }
                weightedSum(owners.map { sources[$0.0].base + lower &* cols }, weights: owners.map(\.1),
                            count: (upper - lower) &* cols, into: base + lower &* cols)
                lower = upper
            }
        }
        return Matrix(rows: rows, cols: cols, values: values)
    }

    /// Weighted sum of B factors of different ranks with one weight per client
    /// and rank slot: column j of the rows×cols result is
    /// Σ_{k: cols_k > j} slotWeights[k][j] · B_k[:, j].
    ///
    /// Row-major B puts a client's slots side by side in every row, so each
    /// output row is summed eight slots at a time in a register over the
    /// clients owning them and stored once: every input byte is read once and
    /// every output byte written once, with no accumulator traffic at all
    /// (a client-by-client pass re-reads a d_out×R accumulator K times, which
    /// no longer fits in L2 at R = 64 with two threads). Equal widths with
    /// weights constant across slots reduce to one ``weightedSum`` call.
    /// The sum runs in client order, so it is bit-identical to ``paddedColumnSum``.
    public static func slotWeightedColumnSum(_ sources: [MatrixView], slotWeights: [[Double]], cols: Int) -> Matrix {
        precondition(sources.count == slotWeights.count, "one weight list per source")
        let rows = sources.first?.rows ?? 0
        precondition(sources.allSatisfy { $0.rows == rows }, "slotWeightedColumnSum needs sources of one height")
        let widths = sources.map { Swift.min($0.cols, cols) }
        let uniform = sources.allSatisfy { $0.cols == cols }
            && slotWeights.allSatisfy { w in w.prefix(cols).allSatisfy { $0 == w.first } }
        if uniform {
            return weightedSum(sources, weights: slotWeights.map { $0.first ?? 0 })
        }
        typealias Lanes = SIMD8<Float>
        let lanesPerBlock = Lanes.scalarCount
        let blocks = (cols + lanesPerBlock - 1) / lanesPerBlock
        // One term per (block of 8 slots, client owning any of them), grouped by block.
        var terms: [SlotTerm] = []
        var blockStarts = [0]
        for block in 0..<blocks {
            let first = block * lanesPerBlock
            for k in sources.indices where widths[k] > first {
                let lanes = Swift.min(lanesPerBlock, widths[k] - first)
                var weight = Lanes(repeating: 0)
                for lane in 0..<lanes { weight[lane] = Float(slotWeights[k][first + lane]) }
                terms.append(SlotTerm(base: sources[k].base + first, stride: sources[k].cols, lanes: lanes, weight: weight))
            }
            blockStarts.append(terms.count)
        }
        let values = makeArray(count: rows &* cols) { out in
            terms.withUnsafeBufferPointer { terms in
                blockStarts.withUnsafeBufferPointer { starts in
                    for i in 0..<rows {
                        for block in 0..<blocks {
                            var sum = Lanes(repeating: 0)
                            var t = starts[block]
                            let end = starts[block &+ 1]
                            while t < end {
                                let term = terms[t]
                                let x = term.base + i &* term.stride
                                switch term.lanes {
                                case 8:
                                    sum += term.weight * UnsafeRawPointer(x).loadUnaligned(as: Lanes.self)
                                case 4:
                                    let half = UnsafeRawPointer(x).loadUnaligned(as: SIMD4<Float>.self)
                                    sum += term.weight * Lanes(lowHalf: half, highHalf: .zero)
                                default:
                                    var partial = Lanes(repeating: 0)
                                    for lane in 0..<term.lanes { partial[lane] = x[lane] }
                                    sum += term.weight * partial
                                }
                                t &+= 1
                            }
                            let o = out + (i &* cols &+ block &* lanesPerBlock)
                            let stored = Swift.min(lanesPerBlock, cols &- block &* lanesPerBlock)
                            if stored == lanesPerBlock {
                                UnsafeMutableRawPointer(o).storeBytes(of: sum, as: Lanes.self)
                            } else {
                                for lane in 0..<stored { o[lane] = sum[lane] }
                            }
                        }
                    }
                }
            }
        }
        return Matrix(rows: rows, cols: cols, values: values)
    }

    /// One client's share of a block of eight rank slots in ``slotWeightedColumnSum``.
    private struct SlotTerm {
        /// The client's first slot of the block, in row 0.
        let base: UnsafePointer<Float>
        /// The client's rank (its row length).
        let stride: Int
        /// How many of the eight slots the client owns (1...8).
        let lanes: Int
        /// Its weights for those slots, zero beyond `lanes`.
        let weight: SIMD8<Float>
    }

    /// ‖B·A‖_F for B (m×r) and A (r×n) without forming the m×n product:
    /// ‖BA‖²_F = tr((BᵀB)(AAᵀ)) = Σ_ij (BᵀB)_ij (AAᵀ)_ij, two r×r Grams by ssyrk
    /// (half the flops of sgemm; only the upper triangles are filled).
    ///
    /// The Grams are Float (OpenBLAS accumulates in Float) and the trace is
    /// summed in Double. The absolute error is about 1e-7·√max(m, n)·‖B‖²‖A‖²,
    /// so the relative error is small unless B·A nearly cancels; good enough
    /// for aggregation weights, not for an exactness check.
    public static func productFrobeniusNorm(b: MatrixView, a: MatrixView) -> Double {
        precondition(b.cols == a.rows, "productFrobeniusNorm needs B.cols == A.rows")
        guard a.rows > 0, b.rows > 0, a.cols > 0 else { return 0 }
        let gramB = gram(b.buffer, rows: b.rows, cols: b.cols, ofColumns: true)
        let gramA = gram(a.buffer, rows: a.rows, cols: a.cols, ofColumns: false)
        return Swift.max(0, zip(gramB, gramA).reduce(0) { $0 + $1.0 * $1.1 }).squareRoot()
    }

    /// The Gram matrix of the columns (XᵀX) or of the rows (XXᵀ) of a row-major
    /// rows×cols Float matrix, through `ssyrk` (half the flops of sgemm), as a
    /// full symmetric Double matrix. OpenBLAS accumulates in Float; callers
    /// that combine Grams into traces sum those in Double.
    public static func gram(_ x: UnsafeBufferPointer<Float>, rows: Int, cols: Int, ofColumns: Bool) -> [Double] {
        precondition(x.count >= rows * cols, "gram needs rows*cols values")
        let n = ofColumns ? cols : rows, depth = ofColumns ? rows : cols
        guard n > 0 else { return [] }
        guard depth > 0, let x = x.baseAddress else { return [Double](repeating: 0, count: n * n) }
        var g = [Float](repeating: 0, count: n * n)
        g.withUnsafeMutableBufferPointer { out in
            cblas_ssyrk(CblasRowMajor, CblasUpper, ofColumns ? CblasTrans : CblasNoTrans,
                        Int32(n), Int32(depth), 1, x, Int32(cols), 0, out.baseAddress, Int32(n))
        }
        var result = [Double](repeating: 0, count: n * n)
        for i in 0..<n {
            for j in i..<n {
                result[i * n + j] = Double(g[i * n + j])
                result[j * n + i] = Double(g[i * n + j])
            }
        }
        return result
    }

    /// Whether every entry of `x` is within `tolerance` of the same entry of
    /// `y` (both `count` long). NaN anywhere fails, so a non-finite input is
    /// never mistaken for agreement.
    public static func allWithin(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, count: Int, tolerance: Float) -> Bool {
        typealias Lanes = SIMD16<Float>
        let width = Lanes.scalarCount
        let upper = Lanes(repeating: tolerance), lower = Lanes(repeating: -tolerance)
        let xs = UnsafeRawPointer(x), ys = UnsafeRawPointer(y)
        // Both comparisons are false for NaN, so `inside` is false there.
        var outside = SIMDMask<SIMD16<Int32>>(repeating: false)
        var i = 0
        while i &+ width <= count {
            let offset = i &* MemoryLayout<Float>.stride
            let difference = xs.loadUnaligned(fromByteOffset: offset, as: Lanes.self)
                - ys.loadUnaligned(fromByteOffset: offset, as: Lanes.self)
            outside = outside .| .!((difference .<= upper) .& (difference .>= lower))
            i &+= width
            // Checked every 4096 entries so a difference stops the scan early.
            if i & 4095 == 0, any(outside) { return false }
        }
        if any(outside) { return false }
        while i < count {
            if !(abs(x[i] - y[i]) <= tolerance) { return false }
            i &+= 1
        }
        return true
    }

    /// The largest |x[i]| (NaN when an entry is NaN).
    public static func maxMagnitude(_ x: UnsafePointer<Float>, count: Int) -> Float {
        typealias Lanes = SIMD16<Float>
        let width = Lanes.scalarCount
        let xs = UnsafeRawPointer(x)
        var largest = Lanes(repeating: 0)
        var sawNaN = SIMDMask<SIMD16<Int32>>(repeating: false)
        var i = 0
        while i &+ width <= count {
            let v = xs.loadUnaligned(fromByteOffset: i &* MemoryLayout<Float>.stride, as: Lanes.self)
            let magnitude = v.replacing(with: -v, where: v .< 0)
            largest.replace(with: magnitude, where: magnitude .> largest)
            sawNaN = sawNaN .| (v .!= v)
            i &+= width
        }
        var result = largest.max()
        var scalarNaN = any(sawNaN)
        while i < count {
            let v = abs(x[i])
            result = v > result ? v : result
            scalarNaN = scalarNaN || v.isNaN
            i &+= 1
        }
        return scalarNaN ? .nan : result
    }
}

extension Kernels {
    /// Makes OpenBLAS run each call on the calling thread.
    ///
    /// The host already spreads modules over every core; an OpenBLAS call that
    /// starts its own threads inside each of those workers oversubscribes the
    /// machine and spins (measured: about 6× slower on 4096×16×16 products).
    /// Call once at start-up of any program that aggregates modules in parallel.
    public static func useSingleThreadedBLAS() {
        openblas_set_num_threads(1)
    }
}
