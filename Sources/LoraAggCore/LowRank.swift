import COpenBLAS

/// Exact SVD of a sum of low-rank products, without the d_out×d_in matrix.
///
/// M = Σ_j w_j B_j A_j has rank at most R = Σ_j r_j. Stacking the factors,
///
/// ```
/// B_cat = [w_1 B_1 … w_T B_T]      (d_out × R)
/// A_cat = [A_1; …; A_T]            (R × d_in)      so  M = B_cat A_cat
/// B_cat = Q_B R_B,  A_catᵀ = Q_A R_A               (Householder QR, LAPACK dgeqrf)
/// M = Q_B (R_B R_Aᵀ) Q_Aᵀ,         core C = R_B R_Aᵀ is only min(d_out,R) × min(d_in,R)
/// C = U_c Σ V_cᵀ                                   (dgesdd)
/// U = Q_B U_c,  Vᵀ = V_cᵀ Q_Aᵀ                     (dormqr on the kept columns only)
/// ```
///
/// Q_B and Q_A have orthonormal columns, so U and V do too and Σ is exactly
/// the spectrum of M: nothing is approximated, only rounded. The cost is
/// O((d_out + d_in)·R² + R³) instead of O(d_out·d_in·min(d_out, d_in)); see
/// docs/lowrank.md. Everything runs in Double, so the Float32 inputs are the
/// only source of error that matters.
public enum LowRank {
    /// One term w·B·A of the sum.
    public struct Term: Sendable {
        /// The term's weight w (for FedAvg of products: p_k s_k).
        public var weight: Double
        /// B, d_out×r.
        public var b: MatrixView
        /// A, r×d_in.
        public var a: MatrixView

        /// Creates a term w·B·A.
        public init(weight: Double, b: MatrixView, a: MatrixView) {
            self.weight = weight
            self.b = b
            self.a = a
        }
    }

    /// The top `keep` singular triplets of a factored sum, and its whole spectrum.
    public struct Factorization: Sendable {
        /// d_out×keep, orthonormal columns (left singular vectors).
        public var u: Matrix
        /// `keep` singular values, descending.
        public var sigma: [Double]
        /// keep×d_in, orthonormal rows (right singular vectors, transposed).
        public var vt: Matrix
        /// Every singular value the sum can have, descending:
        /// min(d_out, d_in, R) of them (R = Σ r_j over terms of non-zero weight).
        public var spectrum: [Double]
        /// The mathematical rank bound min(d_out, d_in, R); columns of `u`,
        /// entries of `sigma` and rows of `vt` past it are zero-filled.
        public var attainableRank: Int

        /// ‖M‖_F² = Σ σ_i² over the whole spectrum.
        public var totalEnergy: Double { spectrum.reduce(0) { $0 + $1 * $1 } }

        /// Σ σ_i² over the first `count` singular values: the energy a rank-`count`
        /// truncation keeps. Summed from the spectrum, not subtracted from the
        /// total, so a tiny tail is not lost to cancellation.
        public func energy(first count: Int) -> Double {
            spectrum.prefix(max(0, count)).reduce(0) { $0 + $1 * $1 }
        }

        /// ‖M − M_count‖_F² = Σ_{i > count} σ_i²: what a rank-`count` truncation loses.
        public func tailEnergy(after count: Int) -> Double {
            spectrum.dropFirst(max(0, count)).reduce(0) { $0 + $1 * $1 }
        }

        /// ‖M − M_count‖_F / ‖M‖_F, or 0 when M is zero.
        public func relativeTruncationError(rank count: Int) -> Double {
            let total = totalEnergy
            return total > 0 ? (tailEnergy(after: count) / total).squareRoot() : 0
        }
    }

    /// The thin SVD of M = Σ_j w_j B_j A_j truncated to `keep` triplets,
    /// computed without forming M (see the type's documentation).
    ///
    /// - `keep` may exceed the rank bound min(d_out, d_in, Σ r_j): the result
    ///   still has exactly `keep` columns/rows, and the ones past the bound are
    ///   zero (σ = 0, zero vectors). Callers that hand such slots to a client
    ///   must decide what to put there (a zero slot in both factors never trains).
    /// - Terms of weight 0 are skipped; no terms at all, or all weights 0,
    ///   give the zero matrix: σ = 0 everywhere and u, vt zero.
    /// - Within the rank bound, singular vectors of zero (or repeated)
    ///   singular values are some orthonormal basis, as from any SVD.
    ///
    /// Throws ``AggregationError/invalidInput(_:)`` for factors whose shapes do
    /// not fit d_out, d_in or each other, and ``AggregationError/internalError(_:)``
    /// when LAPACK reports a failure.
    public static func factoredSVD(terms: [Term], dOut: Int, dIn: Int, keep: Int) throws -> Factorization {
        guard dOut > 0, dIn > 0, keep >= 0 else {
            throw AggregationError.invalidInput("factored SVD: invalid request, shape \(dOut)x\(dIn) keeping \(keep); expected positive dimensions and keep >= 0")
        }
        for (j, term) in terms.enumerated() {
            if term.b.rows != dOut || term.a.cols != dIn || term.b.cols != term.a.rows {
                throw AggregationError.invalidInput("factored SVD: term \(j) is (\(term.b.rows)x\(term.b.cols))·(\(term.a.rows)x\(term.a.cols)); expected (\(dOut)xr)·(rx\(dIn))")
            }
            if !term.weight.isFinite {
                throw AggregationError.invalidInput("factored SVD: term \(j) has weight \(term.weight); expected a finite number")
            }
        }
        let active = terms.filter { $0.weight != 0 && $0.a.rows > 0 }
        let stackedRank = active.reduce(0) { $0 + $1.a.rows }
        // LAPACK takes 32-bit dimensions; every buffer below must be indexable by them.
        guard dOut &* max(stackedRank, keep) < Int(Int32.max), dIn &* max(stackedRank, keep) < Int(Int32.max) else {
            throw AggregationError.invalidInput("factored SVD: stacked factors of \(dOut)x\(stackedRank) and \(stackedRank)x\(dIn) exceed LAPACK's 32-bit indexing")
        }
        let kB = min(dOut, stackedRank), kA = min(dIn, stackedRank)
        let attainable = min(kB, kA)
        if attainable == 0 {
            return Factorization(u: Matrix(zeros: dOut, keep), sigma: Array(repeating: 0, count: keep),
                                 vt: Matrix(zeros: keep, dIn), spectrum: [], attainableRank: 0)
        }

        // Column-major stacks, the layout LAPACK wants. A_j is row-major r_j×d_in,
        // which read column-major is A_jᵀ, so A_catᵀ is the plain concatenation.
        var stackB = [Double](repeating: 0, count: dOut * stackedRank)
        var stackAT = [Double](repeating: 0, count: dIn * stackedRank)
        stackB.withUnsafeMutableBufferPointer { out in
            var column = 0
            for term in active {
                let r = term.b.cols, source = term.b.base, w = term.weight
                for t in 0..<r {
                    let destination = out.baseAddress! + (column &+ t) &* dOut
                    for i in 0..<dOut { destination[i] = w * Double(source[i &* r &+ t]) }
                }
                column &+= r
            }
        }
        stackAT.withUnsafeMutableBufferPointer { out in
            var offset = 0
            for term in active {
                let count = term.a.count, source = term.a.base
                let destination = out.baseAddress! + offset
                for i in 0..<count { destination[i] = Double(source[i]) }
                offset &+= count
            }
        }

        let tauB = try householderQR(&stackB, rows: dOut, cols: stackedRank, what: "B")
        let tauA = try householderQR(&stackAT, rows: dIn, cols: stackedRank, what: "Aᵀ")

        // Core C = R_B R_Aᵀ (kB×kA): only the upper trapezoids of the QR outputs are R.
        var triangleB = upperTrapezoid(stackB, rows: kB, cols: stackedRank, leading: dOut)
        var triangleA = upperTrapezoid(stackAT, rows: kA, cols: stackedRank, leading: dIn)
        var core = [Double](repeating: 0, count: kB * kA)
        triangleB.withUnsafeMutableBufferPointer { rb in
            triangleA.withUnsafeMutableBufferPointer { ra in
                core.withUnsafeMutableBufferPointer { c in
                    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasTrans, Int32(kB), Int32(kA), Int32(stackedRank),
                                1, rb.baseAddress, Int32(kB), ra.baseAddress, Int32(kA), 0, c.baseAddress, Int32(kB))
                }
            }
        }

        let (coreU, spectrum, coreVT) = try smallSVD(&core, rows: kB, cols: kA)
        let kept = min(keep, attainable)

        // U = Q_B [U_c(:, :kept); 0] and V = Q_A [V_c(:, :kept); 0], d×kept column-major.
        var leftVectors = [Double](repeating: 0, count: dOut * kept)
        var rightVectors = [Double](repeating: 0, count: dIn * kept)
        for c in 0..<kept {
            for i in 0..<kB { leftVectors[c * dOut + i] = coreU[c * kB + i] }
            // V_cᵀ is attainable×kA column-major: entry (c, i) at i*attainable + c.
            for i in 0..<kA { rightVectors[c * dIn + i] = coreVT[i * attainable + c] }
        }
        try applyQ(reflectors: &stackB, tau: tauB, rows: dOut, reflectorCount: kB, to: &leftVectors, columns: kept, what: "B")
        try applyQ(reflectors: &stackAT, tau: tauA, rows: dIn, reflectorCount: kA, to: &rightVectors, columns: kept, what: "Aᵀ")

        // Row-major Float outputs, zero past `kept`. V column-major d_in×kept has
        // the memory layout of Vᵀ row-major kept×d_in.
        var u = Matrix(zeros: dOut, keep)
        for i in 0..<dOut { for c in 0..<kept { u.values[i * keep + c] = Float(leftVectors[c * dOut + i]) } }
        var vt = Matrix(zeros: keep, dIn)
        for index in 0..<(kept * dIn) { vt.values[index] = Float(rightVectors[index]) }
        var sigma = Array(spectrum.prefix(kept))
        sigma += Array(repeating: 0, count: keep - kept)
        return Factorization(u: u, sigma: sigma, vt: vt, spectrum: spectrum, attainableRank: attainable)
    }

    /// Householder QR in place (dgeqrf); returns the reflector scalars.
    private static func householderQR(_ matrix: inout [Double], rows: Int, cols: Int, what: String) throws -> [Double] {
        var m = Int32(rows), n = Int32(cols), lda = Int32(rows), info: Int32 = 0
        var tau = [Double](repeating: 0, count: min(rows, cols))
        var query = 0.0, lwork: Int32 = -1
        dgeqrf_(&m, &n, &matrix, &lda, &tau, &query, &lwork, &info)
        if info != 0 { throw lapackFailure("dgeqrf", info, what) }
        lwork = Int32(max(1, query))
        var work = [Double](repeating: 0, count: Int(lwork))
        dgeqrf_(&m, &n, &matrix, &lda, &tau, &work, &lwork, &info)
        if info != 0 { throw lapackFailure("dgeqrf", info, what) }
        return tau
    }

    /// The leading `rows`×`cols` upper trapezoid of a column-major matrix, zeros below the diagonal.
    private static func upperTrapezoid(_ matrix: [Double], rows: Int, cols: Int, leading: Int) -> [Double] {
        var result = [Double](repeating: 0, count: rows * cols)
        for j in 0..<cols {
            for i in 0..<min(j + 1, rows) { result[j * rows + i] = matrix[j * leading + i] }
        }
        return result
    }

    /// SVD of a small column-major matrix (dgesdd, falling back to dgesvd,
    /// whose QR iteration converges in cases divide-and-conquer gives up on).
    /// Returns U (rows×k), σ (k) and Vᵀ (k×cols), k = min(rows, cols), column-major.
    private static func smallSVD(_ matrix: inout [Double], rows: Int, cols: Int) throws -> ([Double], [Double], [Double]) {
        let k = min(rows, cols)
        var m = Int32(rows), n = Int32(cols), lda = Int32(rows), ldu = Int32(rows), ldvt = Int32(k), info: Int32 = 0
        var sigma = [Double](repeating: 0, count: k)
        var u = [Double](repeating: 0, count: rows * k)
        var vt = [Double](repeating: 0, count: k * cols)
        let original = matrix
        var jobz = Int8(UInt8(ascii: "S"))
        var iwork = [Int32](repeating: 0, count: 8 * k)
        var query = 0.0, lwork: Int32 = -1
        dgesdd_(&jobz, &m, &n, &matrix, &lda, &sigma, &u, &ldu, &vt, &ldvt, &query, &lwork, &iwork, &info)
        if info < 0 { throw lapackFailure("dgesdd", info, "the core") }
        lwork = Int32(max(1, query))
        var work = [Double](repeating: 0, count: Int(lwork))
        dgesdd_(&jobz, &m, &n, &matrix, &lda, &sigma, &u, &ldu, &vt, &ldvt, &work, &lwork, &iwork, &info)
        if info == 0 { return (u, sigma, vt) }
        if info < 0 { throw lapackFailure("dgesdd", info, "the core") }

        matrix = original
        var job = Int8(UInt8(ascii: "S"))
        lwork = -1
        dgesvd_(&job, &job, &m, &n, &matrix, &lda, &sigma, &u, &ldu, &vt, &ldvt, &query, &lwork, &info)
        if info != 0 { throw lapackFailure("dgesvd", info, "the core") }
        lwork = Int32(max(1, query))
        work = [Double](repeating: 0, count: Int(lwork))
        dgesvd_(&job, &job, &m, &n, &matrix, &lda, &sigma, &u, &ldu, &vt, &ldvt, &work, &lwork, &info)
        if info != 0 { throw lapackFailure("dgesvd", info, "the core") }
        return (u, sigma, vt)
    }

    /// C ← Q·C for the Q of a dgeqrf factorisation (dormqr), C rows×columns column-major.
    private static func applyQ(reflectors: inout [Double], tau: [Double], rows: Int, reflectorCount: Int,
                               to target: inout [Double], columns: Int, what: String) throws {
        guard columns > 0 else { return }
        var side = Int8(UInt8(ascii: "L")), trans = Int8(UInt8(ascii: "N"))
        var m = Int32(rows), n = Int32(columns), k = Int32(reflectorCount), lda = Int32(rows), ldc = Int32(rows)
        var info: Int32 = 0, query = 0.0, lwork: Int32 = -1
        dormqr_(&side, &trans, &m, &n, &k, &reflectors, &lda, tau, &target, &ldc, &query, &lwork, &info)
        if info != 0 { throw lapackFailure("dormqr", info, what) }
        lwork = Int32(max(1, query))
        var work = [Double](repeating: 0, count: Int(lwork))
        dormqr_(&side, &trans, &m, &n, &k, &reflectors, &lda, tau, &target, &ldc, &work, &lwork, &info)
        if info != 0 { throw lapackFailure("dormqr", info, what) }
    }

    private static func lapackFailure(_ routine: String, _ info: Int32, _ what: String) -> AggregationError {
        let reason = info < 0 ? "argument \(-info) was invalid" : "it did not converge (info \(info))"
        return AggregationError.internalError("factored SVD: LAPACK \(routine) failed on \(what): \(reason)")
    }
}
