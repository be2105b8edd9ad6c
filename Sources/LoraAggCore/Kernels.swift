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
