import LoraAggCore

/// A dense SVD written from scratch (one-sided Jacobi, Double), so tests of
/// the LAPACK-based kernels compare against something that shares no code
/// with them. For the small matrices of the tests only.
enum DenseSVD {
    /// Singular values (descending) and the best rank-k approximation of a
    /// row-major rows×cols matrix.
    struct Result {
        var sigma: [Double]
        /// Left singular vectors, rows × n as columns (row-major), n = min(rows, cols).
        var u: [[Double]]
        /// Right singular vectors, cols × n as columns.
        var v: [[Double]]

        /// U_k Σ_k V_kᵀ, row-major.
        func truncated(_ k: Int, rows: Int, cols: Int) -> [Double] {
            var out = [Double](repeating: 0, count: rows * cols)
            for t in 0..<min(k, sigma.count) {
                for i in 0..<rows { for j in 0..<cols { out[i * cols + j] += sigma[t] * u[t][i] * v[t][j] } }
            }
            return out
        }
    }

    /// SVD of the row-major `rows`×`cols` matrix `m`.
    static func decompose(_ m: [Double], rows: Int, cols: Int) -> Result {
        if rows < cols {
            // Work on Mᵀ so there are at least as many rows as columns.
            var transposed = [Double](repeating: 0, count: rows * cols)
            for i in 0..<rows { for j in 0..<cols { transposed[j * rows + i] = m[i * cols + j] } }
            let result = decompose(transposed, rows: cols, cols: rows)
            return Result(sigma: result.sigma, u: result.v, v: result.u)
        }
        // Columns of the working matrix and of V, as arrays.
        var columns = (0..<cols).map { j in (0..<rows).map { m[$0 * cols + j] } }
        var v = (0..<cols).map { j in (0..<cols).map { $0 == j ? 1.0 : 0.0 } }
        for _ in 0..<100 {
            var rotated = false
            for p in 0..<cols {
                for q in (p + 1)..<max(p + 1, cols) {
                    var alpha = 0.0, beta = 0.0, gamma = 0.0
                    for i in 0..<rows {
                        alpha += columns[p][i] * columns[p][i]
                        beta += columns[q][i] * columns[q][i]
                        gamma += columns[p][i] * columns[q][i]
                    }
                    if abs(gamma) <= 1e-15 * (alpha * beta).squareRoot() || gamma == 0 { continue }
                    rotated = true
                    let zeta = (beta - alpha) / (2 * gamma)
                    let t = (zeta >= 0 ? 1.0 : -1.0) / (abs(zeta) + (1 + zeta * zeta).squareRoot())
                    let c = 1 / (1 + t * t).squareRoot(), s = c * t
                    for i in 0..<rows {
                        let x = columns[p][i], y = columns[q][i]
                        columns[p][i] = c * x - s * y
                        columns[q][i] = s * x + c * y
                    }
                    for i in 0..<cols {
                        let x = v[p][i], y = v[q][i]
                        v[p][i] = c * x - s * y
                        v[q][i] = s * x + c * y
                    }
                }
            }
            if !rotated { break }
        }
        let norms = columns.map { $0.reduce(0) { $0 + $1 * $1 }.squareRoot() }
        let order = norms.indices.sorted { norms[$0] > norms[$1] }
        return Result(sigma: order.map { norms[$0] },
                      u: order.map { j in columns[j].map { norms[j] > 0 ? $0 / norms[j] : 0 } },
                      v: order.map { v[$0] })
    }
}
