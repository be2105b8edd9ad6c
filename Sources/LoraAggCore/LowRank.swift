import COpenBLAS
#if canImport(Glibc)
import Glibc
#endif

/// Exact SVD of a sum of low-rank products, without the d_out×d_in matrix.
///
/// M = Σ_j w_j B_j A_j has rank at most R = Σ_j r_j. Stacking the factors,
///
/// ```
/// B_cat = [w_1 B_1 … w_T B_T]      (d_out × R)
/// A_cat = [A_1; …; A_T]            (R × d_in)      so  M = B_cat A_cat
/// B_cat = Q_B R_B,  A_catᵀ = Q_A R_A               (Cholesky QR, or Householder when unsafe)
/// M = Q_B (R_B R_Aᵀ) Q_Aᵀ,         core C = R_B R_Aᵀ is only min(d_out,R) × min(d_in,R)
/// C = U_c Σ V_cᵀ                                   (dgesdd)
/// U = Q_B U_c,  Vᵀ = V_cᵀ Q_Aᵀ                     (Q applied to the kept columns only)
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

    /// How a stacked factor X (d×R) was split into Q·R.
    public enum Orthogonalisation: String, Sendable {
        /// Cholesky of the equilibrated Gram matrix XᵀX, once: for well-conditioned X.
        case choleskyQR = "cholesky-qr"
        /// Cholesky QR repeated on its own Q: orthogonal to round-off for moderately
        /// ill-conditioned X (used up to an estimated κ₁ of 1e5).
        case choleskyQR2 = "cholesky-qr2"
        /// Householder QR (dgeqrf): for ill-conditioned or rank-deficient X and R > d.
        case householder
    }

    /// The top `keep` singular triplets of a factored sum, and its whole spectrum.
    public struct Factorization: Sendable {
        /// d_out×keep, orthonormal columns (left singular vectors).
        public var u: Matrix
        /// `keep` singular values, descending.
        public var sigma: [Double]
        /// keep×d_in, orthonormal rows (right singular vectors, transposed).
        public var vt: Matrix
        /// Every singular value the sum can have, descending: ``attainableRank`` of them.
        public var spectrum: [Double]
        /// The rank bound min(d_out, d_in, R), R counting the rank slots of
        /// non-zero weight whose B column and A row are both non-zero; columns
        /// of `u`, entries of `sigma` and rows of `vt` past it are zero-filled.
        public var attainableRank: Int
        /// How the stacked B and the stacked Aᵀ were orthogonalised (for tests and benchmarks).
        public var methods: (b: Orthogonalisation, a: Orthogonalisation)

        /// LoRA factors of the best rank-`rank` approximation U_r Σ_r V_rᵀ for a
        /// given PEFT scaling: A = V_rᵀ (orthonormal rows) and B = U_r Σ_r / scaling,
        /// so scaling·B·A = U_r Σ_r V_rᵀ. All of σ goes to B: A's rows then never
        /// vanish, even for σ = 0, so every slot stays trainable. Slots past
        /// ``attainableRank`` get B = 0 and A = ``LowRank/initialisationRow(slot:dIn:)``.
        /// `rank` must not exceed the number of triplets kept.
        public func loraFactors(rank: Int, scaling: Double) -> (a: Matrix, b: Matrix) {
            precondition(rank <= sigma.count, "loraFactors(rank: \(rank)) of an SVD keeping \(sigma.count) triplets")
            let dOut = u.rows, dIn = vt.cols
            var a = Matrix(rows: rank, cols: dIn, values: Array(vt.values.prefix(rank * dIn)))
            for slot in attainableRank..<max(attainableRank, rank) {
                let row = LowRank.initialisationRow(slot: slot, dIn: dIn)
                a.values.replaceSubrange((slot * dIn)..<((slot + 1) * dIn), with: row)
            }
            let factors = (0..<rank).map { sigma[$0] / scaling }
            let width = u.cols
            let values = [Float](unsafeUninitializedCapacity: dOut * rank) { target, initialised in
                u.values.withUnsafeBufferPointer { source in
                    factors.withUnsafeBufferPointer { factor in
                        for i in 0..<dOut {
                            for t in 0..<rank { target[i &* rank &+ t] = Float(Double(source[i &* width &+ t]) * factor[t]) }
                        }
                    }
                }
                initialised = dOut * rank
            }
            return (a, Matrix(rows: dOut, cols: rank, values: values))
        }

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

    /// The SVD of a round's exact FedAvg of products, W = Σ_k p_k s_k B_k A_k
    /// (p_k = n_k/Σn), truncated to `keep` triplets; errors name the module and
    /// client, like the plugin kit's own checks.
    public static func factoredSVD(averaging round: ModuleRound, keep: Int) throws -> Factorization {
        let weights = round.weights
        let terms = round.clients.indices.map { k in
            Term(weight: weights[k] * round.clients[k].scaling, b: round.clients[k].b, a: round.clients[k].a)
        }
        do {
            return try factoredSVD(terms: terms, dOut: round.dOut, dIn: round.dIn, keep: keep)
        } catch AggregationError.invalidInput(let message) {
            if let culprit = round.firstNonFiniteClient() {
                throw AggregationError.invalidInput("module '\(round.module)', client '\(culprit.client)': \(culprit.factor) contains NaN or infinite values")
            }
            throw AggregationError.invalidInput("module '\(round.module)': \(message)")
        } catch AggregationError.internalError(let message) {
            throw AggregationError.internalError("module '\(round.module)': \(message)")
        }
    }

    /// A row as PEFT initialises `lora_A` (Kaiming-uniform, bound 1/√d_in),
    /// from a fixed seed and the slot index, so it is the same for every client
    /// and every call. For rank slots an SVD cannot fill: paired with a zero B
    /// column the slot adds nothing to the update but can still be trained,
    /// whereas zero in both factors would stay zero forever.
    public static func initialisationRow(slot: Int, dIn: Int) -> [Float] {
        var state = 0x6C6F_7261_6167_67 &+ UInt64(truncatingIfNeeded: slot) &* 0x9E37_79B9_7F4A_7C15
        let bound = 1 / Double(dIn).squareRoot()
        return (0..<dIn).map { _ in
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            let unit = Double(z >> 11) / Double(1 << 53)
            return Float((2 * unit - 1) * bound)
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
        let termRank = active.reduce(0) { $0 + $1.a.rows }
        // Which active term each stacked slot belongs to, for messages.
        let slotTerms = active.indices.flatMap { Array(repeating: $0, count: active[$0].a.rows) }
        // LAPACK takes 32-bit dimensions; every buffer below must be indexable by them.
        guard dOut &* max(termRank, keep) < Int(Int32.max), dIn &* max(termRank, keep) < Int(Int32.max) else {
            throw AggregationError.invalidInput("factored SVD: stacked factors of \(dOut)x\(termRank) and \(termRank)x\(dIn) exceed LAPACK's 32-bit indexing")
        }

        // Column-major stacks: A_j is row-major r_j×d_in, which read column-major
        // is A_jᵀ, so A_catᵀ is the plain concatenation; B needs a transpose.
        let scratch = Scratch.forCurrentThread()
        var stackB = scratch.take(0, count: dOut * termRank)
        var stackAT = scratch.take(1, count: dIn * termRank)
        defer {
            scratch.give(0, stackB)
            scratch.give(1, stackAT)
        }
        stackB.withUnsafeMutableBufferPointer { out in
            var column = 0
            for term in active {
                let r = term.b.cols, source = term.b.base, w = term.weight
                // Blocks of rows keep the strided reads of B_j inside L1.
                var lower = 0
                while lower < dOut {
                    let upper = min(lower + 64, dOut)
                    for t in 0..<r {
                        let destination = out.baseAddress! + (column &+ t) &* dOut
                        for i in lower..<upper { destination[i] = w * Double(source[i &* r &+ t]) }
                    }
                    lower = upper
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
        // Gram matrices XᵀX for the stacks Cholesky QR can take (R <= d).
        var gramB = termRank <= dOut ? gram(stackB, rows: dOut, cols: termRank) : nil
        var gramA = termRank <= dIn ? gram(stackAT, rows: dIn, cols: termRank) : nil

        // A slot whose B column or A row is zero adds nothing to M (an untrained
        // PEFT slot has B = 0); dropping it keeps the Gram matrices definite.
        let squaresB = squaredColumnNorms(stackB, rows: dOut, cols: termRank, gram: gramB)
        let squaresA = squaredColumnNorms(stackAT, rows: dIn, cols: termRank, gram: gramA)
        // NaN or ±∞ anywhere in a column makes its squared norm non-finite (Float
        // inputs cannot overflow a Double sum of squares), so this check is free.
        if let slot = (0..<termRank).first(where: { !squaresB[$0].isFinite || !squaresA[$0].isFinite }) {
            let term = terms.indices.filter { terms[$0].weight != 0 && terms[$0].a.rows > 0 }[slotTerms[slot]]
            throw AggregationError.invalidInput("factored SVD: term \(term): \(squaresB[slot].isFinite ? "A" : "B") contains NaN or infinite values")
        }
        let live = (0..<termRank).filter { squaresB[$0] > 0 && squaresA[$0] > 0 }
        if live.count < termRank {
            compact(&stackB, rows: dOut, keeping: live)
            compact(&stackAT, rows: dIn, keeping: live)
            gramB = gramB.map { submatrix($0, n: termRank, keeping: live) }
            gramA = gramA.map { submatrix($0, n: termRank, keeping: live) }
        }
        let stackedRank = live.count

        let kB = min(dOut, stackedRank), kA = min(dIn, stackedRank)
        let attainable = min(kB, kA)
        if attainable == 0 {
            return Factorization(u: Matrix(zeros: dOut, keep), sigma: Array(repeating: 0, count: keep),
                                 vt: Matrix(zeros: keep, dIn), spectrum: [], attainableRank: 0,
                                 methods: (.householder, .householder))
        }

        let left = try Orthogonalised(&stackB, rows: dOut, cols: stackedRank, gram: gramB, what: "B")
        let right = try Orthogonalised(&stackAT, rows: dIn, cols: stackedRank, gram: gramA, what: "Aᵀ")

        // Core C = R_B R_Aᵀ (kB×kA).
        var core = [Double](repeating: 0, count: kB * kA)
        left.triangle.withUnsafeBufferPointer { rb in
            right.triangle.withUnsafeBufferPointer { ra in
                core.withUnsafeMutableBufferPointer { c in
                    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasTrans, Int32(kB), Int32(kA), Int32(stackedRank),
                                1, rb.baseAddress, Int32(kB), ra.baseAddress, Int32(kA), 0, c.baseAddress, Int32(kB))
                }
            }
        }

        let (coreU, spectrum, coreVT) = try smallSVD(&core, rows: kB, cols: kA)
        let kept = min(keep, attainable)

        // U = Q_B [U_c(:, :kept); 0] and V = Q_A [V_c(:, :kept); 0], d×kept column-major.
        var leftVectors = scratch.take(2, count: dOut * kept)
        var rightVectors = scratch.take(3, count: dIn * kept)
        defer {
            scratch.give(2, leftVectors)
            scratch.give(3, rightVectors)
        }
        for c in 0..<kept {
            for i in 0..<kB { leftVectors[c * dOut + i] = coreU[c * kB + i] }
            for i in kB..<dOut { leftVectors[c * dOut + i] = 0 }
            // V_cᵀ is attainable×kA column-major: entry (c, i) at i*attainable + c.
            for i in 0..<kA { rightVectors[c * dIn + i] = coreVT[i * attainable + c] }
            for i in kA..<dIn { rightVectors[c * dIn + i] = 0 }
        }
        try left.applyQ(to: &leftVectors, columns: kept, stack: &stackB)
        try right.applyQ(to: &rightVectors, columns: kept, stack: &stackAT)

        // Singular vectors are defined up to a joint sign; fix it (largest |entry| of
        // each right vector positive) so that stacking the clients in another
        // order gives the same factors, not merely the same product.
        rightVectors.withUnsafeMutableBufferPointer { right in
            leftVectors.withUnsafeMutableBufferPointer { left in
                for c in 0..<kept {
                    let vector = right.baseAddress! + c * dIn
                    if vector[Int(cblas_idamax(Int32(dIn), vector, 1))] < 0 {
                        cblas_dscal(Int32(dIn), -1, vector, 1)
                        cblas_dscal(Int32(dOut), -1, left.baseAddress! + c * dOut, 1)
                    }
                }
            }
        }

        // Row-major Float outputs, zero past `kept`. V column-major d_in×kept has
        // the memory layout of Vᵀ row-major kept×d_in.
        var u = Matrix(zeros: dOut, keep)
        var vt = Matrix(zeros: keep, dIn)
        leftVectors.withUnsafeBufferPointer { source in
            u.values.withUnsafeMutableBufferPointer { target in
                for i in 0..<dOut { for c in 0..<kept { target[i &* keep &+ c] = Float(source[c &* dOut &+ i]) } }
            }
        }
        rightVectors.withUnsafeBufferPointer { source in
            vt.values.withUnsafeMutableBufferPointer { target in
                for index in 0..<(kept * dIn) { target[index] = Float(source[index]) }
            }
        }
        var sigma = Array(spectrum.prefix(kept))
        sigma += Array(repeating: 0, count: keep - kept)
        return Factorization(u: u, sigma: sigma, vt: vt, spectrum: spectrum, attainableRank: attainable,
                             methods: (left.method, right.method))
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

    fileprivate static func lapackFailure(_ routine: String, _ info: Int32, _ what: String) -> AggregationError {
        let reason = info < 0 ? "argument \(-info) was invalid" : "it did not converge (info \(info))"
        return AggregationError.internalError("factored SVD: LAPACK \(routine) failed on \(what): \(reason)")
    }
}

extension LowRank {
    /// Thresholds on the reciprocal 1-norm condition number of the equilibrated
    /// Cholesky factor. Cholesky QR loses orthogonality as u·κ²: once is enough
    /// below κ ≈ 1e3 (error ≲ 1e-10), twice is orthogonal to round-off up to
    /// κ ≈ u^(-1/2) ≈ 1e8 (kept at 1e5 for margin), Householder beyond.
    static let singlePassCondition = 1e-3
    static let doublePassCondition = 1e-5

    /// Scratch arrays kept per thread, so that the megabytes of stacked
    /// factors are not mapped and unmapped by malloc on every call: the page
    /// faults of fresh buffers cost about a third of the time otherwise. Each
    /// thread keeps its largest buffers until it exits.
    fileprivate final class Scratch {
        private var arrays: [[Double]] = [[], [], [], []]

        /// Array `slot`, with at least `count` entries of unspecified value.
        func take(_ slot: Int, count: Int) -> [Double] {
            var array: [Double] = []
            swap(&array, &arrays[slot])
            if array.count < count { array = [Double](repeating: 0, count: count) }
            return array
        }

        /// Returns an array taken with ``take(_:count:)``.
        func give(_ slot: Int, _ array: [Double]) { arrays[slot] = array }

        static func forCurrentThread() -> Scratch {
            if let pointer = pthread_getspecific(scratchKey) {
                return Unmanaged<Scratch>.fromOpaque(pointer).takeUnretainedValue()
            }
            let scratch = Scratch()
            pthread_setspecific(scratchKey, Unmanaged.passRetained(scratch).toOpaque())
            return scratch
        }
    }

    /// XᵀX (upper triangle, column-major cols×cols) of a column-major rows×cols X.
    fileprivate static func gram(_ x: [Double], rows: Int, cols: Int) -> [Double] {
        var result = [Double](repeating: 0, count: cols * cols)
        cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, Int32(cols), Int32(rows), 1, x, Int32(rows), 0, &result, Int32(cols))
        return result
    }

    /// ‖x_j‖² for every column: the Gram diagonal when there is one.
    fileprivate static func squaredColumnNorms(_ x: [Double], rows: Int, cols: Int, gram: [Double]?) -> [Double] {
        if let gram { return (0..<cols).map { gram[$0 * cols + $0] } }
        return x.withUnsafeBufferPointer { buffer in
            (0..<cols).map { j in cblas_ddot(Int32(rows), buffer.baseAddress! + j * rows, 1, buffer.baseAddress! + j * rows, 1) }
        }
    }

    /// The rows and columns `keeping` of an n×n column-major matrix.
    fileprivate static func submatrix(_ matrix: [Double], n: Int, keeping indices: [Int]) -> [Double] {
        var result = [Double](repeating: 0, count: indices.count * indices.count)
        for (j, column) in indices.enumerated() {
            for (i, row) in indices.enumerated() { result[j * indices.count + i] = matrix[column * n + row] }
        }
        return result
    }

    /// Moves the listed columns of a column-major matrix with `rows` rows to the front, in order.
    fileprivate static func compact(_ matrix: inout [Double], rows: Int, keeping columns: [Int]) {
        for (target, column) in columns.enumerated() where target != column {
            for i in 0..<rows { matrix[target * rows + i] = matrix[column * rows + i] }
        }
    }

    /// X = Q·R for one stacked factor X (d×R, column-major), Q kept implicit.
    ///
    /// Cholesky QR first (BLAS-3: a Gram matrix and a triangular solve, several
    /// times faster than Householder on these tall, thin stacks), repeated once
    /// when X is moderately ill-conditioned, and Householder when the Gram
    /// matrix is too ill-conditioned for either, or singular, or R > d.
    fileprivate struct Orthogonalised {
        let method: Orthogonalisation
        /// The R factor: min(d, R)×R upper trapezoid, column-major.
        let triangle: [Double]
        let rows: Int
        let cols: Int
        /// Householder: the reflector scalars (the reflectors stay in the stack).
        private var tau: [Double] = []
        /// Cholesky QR: Q = W·T⁻¹, W left in the stack, T this R×R upper triangle.
        private var solveTriangle: [Double] = []

        /// `gram` is XᵀX (upper triangle) when the caller has it; without it, Householder.
        init(_ stack: inout [Double], rows: Int, cols: Int, gram: [Double]?, what: String) throws {
            self.rows = rows
            self.cols = cols
            if cols <= rows, let gram, let cholesky = Self.choleskyQR(&stack, rows: rows, cols: cols, gram: gram) {
                method = cholesky.method
                triangle = cholesky.triangle
                solveTriangle = cholesky.solve
                return
            }
            method = .householder
            tau = try Self.householderQR(&stack, rows: rows, cols: cols, what: what)
            let k = min(rows, cols)
            var upper = [Double](repeating: 0, count: k * cols)
            for j in 0..<cols { for i in 0..<min(j + 1, k) { upper[j * k + i] = stack[j * rows + i] } }
            triangle = upper
        }

        /// Y ← Q·Y for Y d×`columns` column-major whose first min(d, R) rows are the input.
        func applyQ(to target: inout [Double], columns: Int, stack: inout [Double]) throws {
            guard columns > 0 else { return }
            if method == .householder {
                var side = Int8(UInt8(ascii: "L")), trans = Int8(UInt8(ascii: "N"))
                var m = Int32(rows), n = Int32(columns), k = Int32(min(rows, cols)), lda = Int32(rows), ldc = Int32(rows)
                var info: Int32 = 0, query = 0.0, lwork: Int32 = -1
                dormqr_(&side, &trans, &m, &n, &k, &stack, &lda, tau, &target, &ldc, &query, &lwork, &info)
                if info != 0 { throw LowRank.lapackFailure("dormqr", info, "the stacked factors") }
                lwork = Int32(max(1, query))
                var work = [Double](repeating: 0, count: Int(lwork))
                dormqr_(&side, &trans, &m, &n, &k, &stack, &lda, tau, &target, &ldc, &work, &lwork, &info)
                if info != 0 { throw LowRank.lapackFailure("dormqr", info, "the stacked factors") }
                return
            }
            // Q·Y = W·(T⁻¹·Y): a small triangular solve, then one d×R×columns product.
            var small = [Double](repeating: 0, count: cols * columns)
            for c in 0..<columns { for i in 0..<cols { small[c * cols + i] = target[c * rows + i] } }
            cblas_dtrsm(CblasColMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, Int32(cols), Int32(columns),
                        1, solveTriangle, Int32(cols), &small, Int32(cols))
            cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(columns), Int32(cols),
                        1, stack, Int32(rows), small, Int32(cols), 0, &target, Int32(rows))
        }

        /// Cholesky QR (once or twice) in place: on success the stack holds W with
        /// Q = W·T⁻¹; returns nil, with the stack untouched, when X is too
        /// ill-conditioned for it.
        private static func choleskyQR(_ stack: inout [Double], rows: Int, cols: Int, gram xtx: [Double])
            -> (method: Orthogonalisation, triangle: [Double], solve: [Double])? {
            let n = cols
            var gram = xtx
            // Equilibrate to unit diagonal, so that the condition estimate is that of X
            // with normalised columns: clients of very different weights must not
            // force the slow path.
            let norms = (0..<n).map { gram[$0 * n + $0].squareRoot() }
            guard norms.allSatisfy({ $0 > 0 && $0.isFinite }) else { return nil }
            for j in 0..<n { for i in 0...j { gram[j * n + i] /= norms[i] * norms[j] } }
            guard var first = cholesky(gram, n: n), let rcond = reciprocalCondition(first, n: n),
                  rcond >= LowRank.doublePassCondition else { return nil }

            // The factor of XᵀX itself is R₁ = R₁'·D⁻¹ (D = diag(1/norms) equilibrated it).
            for j in 0..<n { for i in 0...j { first[j * n + i] *= norms[j] } }
            if rcond >= LowRank.singlePassCondition {
                return (.choleskyQR, first, first)
            }
            // Q₁ = X·R₁⁻¹, then Q₁ = Q·R₂: X = Q·R₂R₁ and Q = Q₁·R₂⁻¹.
            cblas_dtrsm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, Int32(rows), Int32(n),
                        1, first, Int32(n), &stack, Int32(rows))
            var second = [Double](repeating: 0, count: n * n)
            cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, Int32(n), Int32(rows), 1, stack, Int32(rows), 0, &second, Int32(n))
            guard let secondFactor = cholesky(second, n: n) else {
                // Cannot happen for rcond above the threshold; restore X and let Householder handle it.
                cblas_dtrmm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, Int32(rows), Int32(n),
                            1, first, Int32(n), &stack, Int32(rows))
                return nil
            }
            cblas_dtrmm(CblasColMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, Int32(n), Int32(n),
                        1, secondFactor, Int32(n), &first, Int32(n))
            return (.choleskyQR2, first, secondFactor)
        }

        /// The upper Cholesky factor of a symmetric matrix given by its upper triangle, or nil if not positive definite.
        private static func cholesky(_ matrix: [Double], n: Int) -> [Double]? {
            var factor = matrix
            var uplo = Int8(UInt8(ascii: "U")), order = Int32(n), lda = Int32(n), info: Int32 = 0
            dpotrf_(&uplo, &order, &factor, &lda, &info)
            if info != 0 { return nil }
            for j in 0..<n { for i in (j + 1)..<max(j + 1, n) { factor[j * n + i] = 0 } }
            return factor
        }

        /// LAPACK's estimate of 1/κ₁ of an upper triangle (dtrcon), or nil if it fails.
        private static func reciprocalCondition(_ triangle: [Double], n: Int) -> Double? {
            var norm = Int8(UInt8(ascii: "1")), uplo = Int8(UInt8(ascii: "U")), diag = Int8(UInt8(ascii: "N"))
            var order = Int32(n), lda = Int32(n), rcond = 0.0, info: Int32 = 0
            var work = [Double](repeating: 0, count: 3 * n), iwork = [Int32](repeating: 0, count: n)
            dtrcon_(&norm, &uplo, &diag, &order, triangle, &lda, &rcond, &work, &iwork, &info)
            return info == 0 && rcond.isFinite ? rcond : nil
        }

        /// Householder QR in place (dgeqrf); returns the reflector scalars.
        private static func householderQR(_ matrix: inout [Double], rows: Int, cols: Int, what: String) throws -> [Double] {
            var m = Int32(rows), n = Int32(cols), lda = Int32(rows), info: Int32 = 0
            var tau = [Double](repeating: 0, count: min(rows, cols))
            var query = 0.0, lwork: Int32 = -1
            dgeqrf_(&m, &n, &matrix, &lda, &tau, &query, &lwork, &info)
            if info != 0 { throw LowRank.lapackFailure("dgeqrf", info, what) }
            lwork = Int32(max(1, query))
            var work = [Double](repeating: 0, count: Int(lwork))
            dgeqrf_(&m, &n, &matrix, &lda, &tau, &work, &lwork, &info)
            if info != 0 { throw LowRank.lapackFailure("dgeqrf", info, what) }
            return tau
        }
    }
}

/// The key of ``LowRank/Scratch``; its destructor releases a thread's scratch when the thread exits.
private let scratchKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { pointer in
        if let pointer { Unmanaged<AnyObject>.fromOpaque(pointer).release() }
    }
    return key
}()
