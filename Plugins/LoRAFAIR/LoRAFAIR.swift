// lora-fair — LoRA-FAIR [Bian et al., 2024], arXiv:2411.14961.
// Goals, in order: a corrected B̄ closer to the ideal update than FedIT's; no
// d_out×d_in matrix (only r×r products and solves); speed.

import COpenBLAS
import LoraAggPluginKit

/// Keeps the averaged Ā and corrects the averaged B̄ by a residual ΔB, so
/// that s·(B̄ + ΔB)Ā is closer to the ideal update than FedIT's s·B̄Ā.
///
/// ```
/// p_k = n_k / Σ n_j,   s = common scaling,   c_k = √(s_k / s)
/// Ā = Σ p_k c_k A_k,   B̄ = Σ p_k c_k B_k            (FedIT)
/// T = Σ p_k (s_k/s) B_k A_k                          (ideal update / s)
/// G = ĀĀᵀ,   M_k = A_k Āᵀ                            (r×r)
/// P = (T − B̄Ā)Āᵀ = Σ_k B_k · p_k c_k (c_k M_k − G)  (d_out×r, never T itself)
///
/// solver=closed-form (default):
///   ΔB = argmin ‖T − (B̄+ΔB)Ā‖²_F + λ'‖ΔB‖²_F = P (G + λ'I)⁻¹
///   λ' = λ · tr(G)/r
/// solver=cosine (the paper's objective):
///   ΔB = argmin 1 − cos((B̄+ΔB)Ā, T) + λ‖ΔB‖_F / ‖B̄‖_F
/// global adapter: Ā, B̄ + ΔB, scaling s
/// ```
///
/// λ' = λ·tr(ĀĀᵀ)/r is λ times the mean eigenvalue of ĀĀᵀ, so λ means the
/// same ridge strength (relative to how strongly Ā acts) whatever d_in and the
/// magnitude of A; λ = 0 gives the minimum-norm least-squares fit (a
/// pseudo-inverse, so a rank-deficient Ā is fine). Both objectives are
/// evaluated through r×r traces: ⟨XĀ, T⟩ = ⟨X, P + B̄G⟩, ‖XĀ‖² = tr(XᵀX G),
/// and ‖T‖² = ‖B̄Ā‖² + 2⟨B̄, P⟩ + ‖T − B̄Ā‖², the last from the Gram matrices of
/// the centred factors [p_k(c_k B_k − B̄)] and [c_k A_k − c_m A_m] (see fedex-lora).
///
/// The cosine solver is proximal gradient descent with backtracking on ΔB
/// from ΔB = 0. Every iterate lies in the span of the columns of B̄ and P
/// (the gradient is a combination of P + B̄G and (B̄+ΔB)G, and the proximal
/// step only scales ΔB), so the iteration runs exactly, at r×r cost, on the
/// 2r×r coefficients of ΔB in that span.
///
/// Deviations from the paper: the default solver is the closed form of the
/// squared-Frobenius objective, not SGD on 1 − cosine (the paper's optimum
/// is reached by `solver=cosine`); the cosine solver's penalty is divided by
/// ‖B̄‖_F and its step is in units of ‖B̄‖²_F, so λ and the learning rate do
/// not depend on the scale of B; sample weights p_k; clients with different
/// scalings are rescaled to a common s. Limitation: ΔB·Ā lies in the row
/// space of Ā, so only the part of T − B̄Ā inside it can be corrected
/// (`cosine_before`/`cosine_after` show how much). Equal ranks only.
struct LoRAFAIR: Strategy {
    static let info = StrategyInfo(
        name: "lora-fair",
        version: "1.0.0",
        summary: "Keeps the averaged A and corrects the averaged B so that the product moves towards the ideal update.",
        citation: "Bian, Wang, Zhang, Xu, LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement, ICCV 2025, arXiv:2411.14961",
        description: """
            Ā = Σ p_k c_k A_k and B̄ = Σ p_k c_k B_k (c_k = √(s_k/s)); the global B is B̄ + ΔB. \
            solver=closed-form (default, a deliberate deviation from the paper's SGD on 1 − cosine): \
            ΔB = P(ĀĀᵀ + λ'I)⁻¹ with P = Σ_k B_k·p_k c_k(c_k A_kĀᵀ − ĀĀᵀ) and λ' = λ·tr(ĀĀᵀ)/r, only r×r products and solves. \
            solver=cosine: the paper's objective 1 − cos((B̄+ΔB)Ā, ideal) + λ‖ΔB‖/‖B̄‖ by proximal gradient descent at r×r cost. \
            Only the part of the aggregation error inside the row space of Ā can be corrected; cosine_before and \
            cosine_after report how much was. Not exact. Equal ranks only.
            """,
        capabilities: [],
        parameters: [
            .choice("solver", default: "closed-form", choices: ["closed-form", "cosine"],
                    help: "closed-form: ridge least squares ‖ideal − (B̄+ΔB)Ā‖² + λ'‖ΔB‖²; cosine: the paper's 1 − cosine + λ‖ΔB‖/‖B̄‖, solved iteratively"),
            .number("lambda", default: 0.01, minimum: 0,
                    help: "Regularisation of ΔB (paper: 0.01); closed-form uses λ·tr(ĀĀᵀ)/r, cosine divides ‖ΔB‖ by ‖B̄‖"),
            .integer("iterations", default: 200, minimum: 1, maximum: 100_000,
                     help: "With solver=cosine: gradient steps"),
            .number("learning_rate", default: 0.01, minimum: 1e-12,
                    help: "With solver=cosine: initial step, in units of ‖B̄‖²_F (adapted by backtracking)"),
            .boolean("diagnostics", default: true,
                     help: "Report cosine_before/cosine_after (costs two q×q Gram matrices, q = (K−1)r); delta_b_relative is always reported"),
        ])

    enum Solver: String { case closedForm = "closed-form", cosine }

    let solver: Solver
    let lambda: Double
    let iterations: Int
    let learningRate: Double
    let reportCosines: Bool

    init(parameters: StrategyParameters) throws {
        solver = Solver(rawValue: parameters.string("solver")) ?? .closedForm
        lambda = parameters.number("lambda")
        iterations = parameters.integer("iterations")
        learningRate = parameters.number("learning_rate")
        reportCosines = parameters.boolean("diagnostics")
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        try round.requireEqualRanks(strategy: Self.info.name)
        let weights = round.weights
        let s = round.commonScaling
        let active = round.clients.indices.filter { weights[$0] > 0 }
        let rescale = round.clients.indices.map { round.factorRescale($0) }
        let r = round.clients[0].rank, dOut = round.dOut, dIn = round.dIn

        let factorWeights = active.map { Float(weights[$0] * rescale[$0]) }
        let block = Self.block, columnBlock = Self.columnBlock

        // Pass over the A factors, column blocks at a time: Ā's block, then
        // M_k += A_k[:, block]·Ā[:, block]ᵀ while A_k's block is still in cache.
        // G = ĀĀᵀ = Σ p_k c_k M_k comes free.
        var abar = [Float](repeating: 0, count: r * dIn)
        var m = [Float](repeating: 0, count: active.count * r * r)
        abar.withUnsafeMutableBufferPointer { abarOut in
            m.withUnsafeMutableBufferPointer { mOut in
                let mean = abarOut.baseAddress!
                var column = 0
                while column < dIn {
                    let width = min(columnBlock, dIn - column)
                    for t in 0..<r {
                        let offset = t * dIn + column
                        Kernels.weightedSum(active.map { round.clients[$0].a.base + offset }, weights: factorWeights,
                                            count: width, into: mean + offset)
                    }
                    for (slot, k) in active.enumerated() {
                        // Per block rather than one call over d_in: measured faster (OpenBLAS's
                        // small-matrix kernel, and A_k's block is still in cache).
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(r), Int32(r), Int32(width), 1,
                                    round.clients[k].a.base + column, Int32(dIn), mean + column, Int32(dIn),
                                    column == 0 ? 0 : 1, mOut.baseAddress! + slot * r * r, Int32(r))
                    }
                    column += width
                }
            }
        }
        var gram = [Double](repeating: 0, count: r * r)
        for (slot, k) in active.enumerated() {
            let w = weights[k] * rescale[k]
            for i in 0..<(r * r) { gram[i] += w * Double(m[slot * r * r + i]) }
        }
        if !gram.allSatisfy({ $0.isFinite }) { try Self.refuseNonFinite(round) }
        for i in 0..<r { for j in 0..<i { gram[i * r + j] = 0.5 * (gram[i * r + j] + gram[j * r + i]); gram[j * r + i] = gram[i * r + j] } }
        // N_k = p_k c_k (c_k M_k − G).
        var n = [Float](repeating: 0, count: active.count * r * r)
        for (slot, k) in active.enumerated() {
            let c = rescale[k], w = weights[k] * c
            for i in 0..<(r * r) { n[slot * r * r + i] = Float(w * (c * Double(m[slot * r * r + i]) - gram[i])) }
        }

        // Pass over the B factors, row blocks at a time: B̄'s block, P's block
        // = Σ_k B_k[block]·N_k, and their Gram blocks for ZᵀZ (Z = [B̄ P]).
        var bbar = [Float](repeating: 0, count: dOut * r)
        var p = [Float](repeating: 0, count: dOut * r)
        var zzBlocks = [Float](repeating: 0, count: 3 * r * r)  // B̄ᵀB̄, B̄ᵀP, PᵀP
        bbar.withUnsafeMutableBufferPointer { bbarOut in
            p.withUnsafeMutableBufferPointer { pOut in
                zzBlocks.withUnsafeMutableBufferPointer { zzOut in
                    n.withUnsafeBufferPointer { nIn in
                        var row = 0
                        while row < dOut {
                            let height = min(block, dOut - row)
                            let offset = row * r
                            let meanBlock = bbarOut.baseAddress! + offset, pBlock = pOut.baseAddress! + offset
                            Kernels.weightedSum(active.map { round.clients[$0].b.base + offset }, weights: factorWeights,
                                                count: height * r, into: meanBlock)
                            for (slot, k) in active.enumerated() {
                                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(height), Int32(r), Int32(r), 1,
                                            round.clients[k].b.base + offset, Int32(r), nIn.baseAddress! + slot * r * r, Int32(r),
                                            slot == 0 ? 0 : 1, pBlock, Int32(r))
                            }
                            let beta: Float = row == 0 ? 0 : 1
                            for (index, (left, right)) in [(meanBlock, meanBlock), (meanBlock, pBlock), (pBlock, pBlock)].enumerated() {
                                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(r), Int32(r), Int32(height), 1,
                                            left, Int32(r), right, Int32(r), beta, zzOut.baseAddress! + index * r * r, Int32(r))
                            }
                            row += height
                        }
                    }
                }
            }
        }

        // Everything below is r×r algebra on the coefficients of ΔB in span[B̄, P].
        let basis = Basis(bbar: bbar, p: p, gram: gram, r: r, dOut: dOut, grams: zzBlocks)
        var diagnostics: [Diagnostic] = []
        let needIdealNorm = reportCosines || solver == .cosine
        let idealNorm = needIdealNorm ? Self.idealNorm(round, active: active, rescale: rescale, bbar: bbar, basis: basis) : 0

        let coefficients: [Double]  // D (2r×r): ΔB = [B̄ P]·D
        switch solver {
        case .closedForm:
            let trace = (0..<r).reduce(0.0) { $0 + gram[$1 * r + $1] }
            let ridge = lambda * trace / Double(r)
            let inverse = try Self.regularisedInverse(gram, n: r, ridge: ridge, module: round.module)
            coefficients = [Double](repeating: 0, count: r * r) + inverse
            diagnostics.append(Diagnostic("lambda_effective", ridge))
        case .cosine:
            let result = basis.minimiseCosine(idealNorm: idealNorm, lambda: lambda, iterations: iterations, learningRate: learningRate)
            coefficients = result.d
            diagnostics.append(Diagnostic("iterations_run", Double(result.iterations)))
        }

        let corrected = basis.combine(basis.withIdentity(coefficients))

        let bbarNorm = basis.bbarNorm
        let deltaNorm = basis.norm(coefficients)
        diagnostics.append(Diagnostic("delta_b_relative", bbarNorm > 0 ? deltaNorm / bbarNorm : deltaNorm))
        if reportCosines {
            diagnostics.append(Diagnostic("cosine_before", basis.cosine(d: [Double](repeating: 0, count: 2 * r * r), idealNorm: idealNorm)))
            diagnostics.append(Diagnostic("cosine_after", basis.cosine(d: coefficients, idealNorm: idealNorm)))
        }
        return AggregationResult(a: Matrix(rows: r, cols: dIn, values: abar), b: Matrix(rows: dOut, cols: r, values: corrected), scaling: s,
                                 diagnostics: diagnostics)
    }

    /// ‖T‖_F with T = Σ p_k (s_k/s) B_k A_k, without forming T:
    /// ‖B̄Ā‖² + 2⟨B̄, P⟩ + ‖Σ_{k≠m} p_k(c_k B_k − B̄)(c_k A_k − c_m A_m)‖²,
    /// the last through the Gram matrices of the two stacks.
    static func idealNorm(_ round: ModuleRound, active: [Int], rescale: [Double], bbar: [Float], basis: Basis) -> Double {
        let weights = round.weights
        let r = basis.r, dOut = round.dOut, dIn = round.dIn
        let pivot = active.max { weights[$0] < weights[$1] || (weights[$0] == weights[$1] && $0 > $1) }!
        let others = active.filter { $0 != pivot }
        let q = others.count * r
        var residualSquared = 0.0
        if q > 0 {
            let pivotA = round.clients[pivot].a.base, pivotC = Float(rescale[pivot])
            // Every entry is written, so the arrays skip their zero fill.
            let v = [Float](unsafeUninitializedCapacity: q * dIn) { out, initialized in
                for (slot, k) in others.enumerated() {
                    let a = round.clients[k].a.base, c = Float(rescale[k])
                    let row = out.baseAddress! + slot * r * dIn
                    for i in 0..<(r * dIn) { row[i] = c * a[i] - pivotC * pivotA[i] }
                }
                initialized = q * dIn
            }
            let u = bbar.withUnsafeBufferPointer { mean in
                [Float](unsafeUninitializedCapacity: dOut * q) { out, initialized in
                    for (slot, k) in others.enumerated() {
                        let b = round.clients[k].b.base, c = Float(rescale[k]), w = Float(weights[k])
                        for i in 0..<dOut {
                            let target = out.baseAddress! + i * q + slot * r, source = b + i * r, m = mean.baseAddress! + i * r
                            for t in 0..<r { target[t] = w * (c * source[t] - m[t]) }
                        }
                    }
                    initialized = dOut * q
                }
            }
            let gramU = columnGram(u, rows: dOut, cols: q), gramV = rowGram(v, rows: q, cols: dIn)
            residualSquared = max(0, zip(gramU, gramV).reduce(0) { $0 + $1.0 * $1.1 })
        }
        let zero = [Double](repeating: 0, count: 2 * r * r)
        let averageSquared = basis.productSquared(c: basis.withIdentity(zero))
        let cross = basis.innerBbarP
        return max(0, averageSquared + 2 * cross + residualSquared).squareRoot()
    }

    /// Throws for a round whose factors hold NaN or infinities (invalid
    /// input, naming the client), or else for an overflow of our own.
    static func refuseNonFinite(_ round: ModuleRound) throws -> Never {
        if let culprit = round.firstNonFiniteClient() {
            throw AggregationError.invalidInput("module '\(round.module)', client '\(culprit.client)': \(culprit.factor) contains NaN or infinite values")
        }
        throw AggregationError.internalError("module '\(round.module)': the Gram matrix of A overflowed; the factors are too large for Float32 products")
    }

    /// Rows per block of the fused pass over B: a client's block (256×r
    /// floats) stays in L1/L2 between its uses. Splitting the products into
    /// blocks also measured faster than whole-array calls (with OpenBLAS
    /// single-threaded, as the host sets it, that is the only reason left).
    static let block = 256

    /// Columns per block of the pass over A: wider than `block` because the
    /// r×r×width products there run faster with a longer inner dimension,
    /// and K clients' r×512 blocks still fit in L2.
    static let columnBlock = 512

    /// XXᵀ of a row-major rows×cols Float matrix, as Double.
    static func rowGram(_ x: [Float], rows: Int, cols: Int) -> [Double] {
        x.withUnsafeBufferPointer { Kernels.gram($0, rows: rows, cols: cols, ofColumns: false) }
    }

    /// XᵀX of a row-major rows×cols Float matrix, as Double.
    static func columnGram(_ x: [Float], rows: Int, cols: Int) -> [Double] {
        x.withUnsafeBufferPointer { Kernels.gram($0, rows: rows, cols: cols, ofColumns: true) }
    }

    /// (G + ridge·I)⁻¹ for symmetric positive semi-definite G; directions
    /// with eigenvalue + ridge at round-off level are dropped, which gives the
    /// pseudo-inverse (minimum-norm least squares) at ridge 0.
    static func regularisedInverse(_ g: [Double], n: Int, ridge: Double, module: String) throws -> [Double] {
        let (values, vectors) = symmetricEigen(g, n: n)
        guard values.allSatisfy({ $0.isFinite }) else {
            throw AggregationError.internalError("module '\(module)': eigen-decomposition of the \(n)x\(n) Gram matrix of A did not give finite values")
        }
        let largest = (values.max() ?? 0) + ridge
        var inverse = [Double](repeating: 0, count: n * n)
        for e in 0..<n where values[e] + ridge > largest * 1e-10 && values[e] + ridge > 0 {
            let scale = 1 / (values[e] + ridge)
            for i in 0..<n { for j in 0..<n { inverse[i * n + j] += scale * vectors[i * n + e] * vectors[j * n + e] } }
        }
        return inverse
    }

    /// Eigenvalues and eigenvectors (column e of the row-major result) of a
    /// small symmetric matrix, through LAPACK `dsyevd`.
    ///
    /// (A hand Jacobi solver used to stand here because OpenBLAS threaded the
    /// `dsymv` inside `dsytrd` even for 16×16 matrices, and those threads
    /// fought the host's per-module threads; the host now runs OpenBLAS
    /// single-threaded, and `dsyevd` is several times faster.) On failure the
    /// eigenvalues are NaN, which the caller reports.
    static func symmetricEigen(_ matrix: [Double], n: Int) -> (values: [Double], vectors: [Double]) {
        // Symmetric, so the row-major input is its own column-major form; the
        // result holds eigenvector e in column-major column e, i.e. row e here.
        var a = matrix
        var values = [Double](repeating: 0, count: n)
        var size = Int32(n), lda = Int32(max(1, n)), info: Int32 = 0
        var workSize = 0.0, iworkSize: Int32 = 0, query: Int32 = -1
        dsyevd_("V", "U", &size, &a, &lda, &values, &workSize, &query, &iworkSize, &query, &info)
        var lwork = Int32(workSize), liwork = iworkSize
        var work = [Double](repeating: 0, count: max(1, Int(lwork)))
        var iwork = [Int32](repeating: 0, count: max(1, Int(liwork)))
        if info == 0 {
            dsyevd_("V", "U", &size, &a, &lda, &values, &work, &lwork, &iwork, &liwork, &info)
        }
        guard info == 0 else { return ([Double](repeating: .nan, count: n), [Double](repeating: 0, count: n * n)) }
        var vectors = [Double](repeating: 0, count: n * n)
        for e in 0..<n { for i in 0..<n { vectors[i * n + e] = a[e * n + i] } }
        return (values, vectors)
    }
}

/// The span of the columns of B̄ and P, where ΔB lives, with the r×r
/// quantities that evaluate every objective: ZᵀZ for Z = [B̄ P] and G = ĀĀᵀ.
/// A candidate corrected B is Z·C with C (2r×r) = [I; 0] + D.
struct Basis {
    let bbar: [Float]
    let p: [Float]
    let gram: [Double]
    let r: Int
    let dOut: Int
    /// ZᵀZ, 2r×2r.
    let zz: [Double]

    /// `grams` holds B̄ᵀB̄, B̄ᵀP and PᵀP, r×r each, row-major.
    init(bbar: [Float], p: [Float], gram: [Double], r: Int, dOut: Int, grams: [Float]) {
        self.bbar = bbar
        self.p = p
        self.gram = gram
        self.r = r
        self.dOut = dOut
        var zz = [Double](repeating: 0, count: 4 * r * r)
        for (index, (row, column)) in [(0, 0), (0, 1), (1, 1)].enumerated() {
            for i in 0..<r {
                for j in 0..<r {
                    let value = Double(grams[index * r * r + i * r + j])
                    zz[(row * r + i) * 2 * r + column * r + j] = value
                    zz[(column * r + j) * 2 * r + row * r + i] = value
                }
            }
        }
        // The diagonal blocks are Grams: symmetrise away the rounding of the GEMMs.
        for i in 0..<(2 * r) { for j in 0..<i { let v = 0.5 * (zz[i * 2 * r + j] + zz[j * 2 * r + i]); zz[i * 2 * r + j] = v; zz[j * 2 * r + i] = v } }
        self.zz = zz
    }

    /// x (a×b) · y (b×c), Double, row-major.
    func multiply(_ x: [Double], _ y: [Double], _ a: Int, _ b: Int, _ c: Int) -> [Double] {
        var out = [Double](repeating: 0, count: a * c)
        Kernels.gemm(x, y, &out, m: a, n: c, k: b)
        return out
    }

    /// tr(Xᵀ Y) for equally shaped matrices.
    func inner(_ x: [Double], _ y: [Double]) -> Double { zip(x, y).reduce(0) { $0 + $1.0 * $1.1 } }

    /// [I; 0] + d.
    func withIdentity(_ d: [Double]) -> [Double] {
        var c = d
        for i in 0..<r { c[i * r + i] += 1 }
        return c
    }

    /// ⟨Z x, Z y⟩ for 2r×r coefficient matrices.
    func metric(_ x: [Double], _ y: [Double]) -> Double { inner(x, multiply(zz, y, 2 * r, 2 * r, r)) }

    /// ‖Z d‖_F.
    func norm(_ d: [Double]) -> Double { max(0, metric(d, d)).squareRoot() }

    var bbarNorm: Double { (0..<r).reduce(0.0) { $0 + zz[$1 * 2 * r + $1] }.squareRoot() }

    /// ⟨B̄, P⟩.
    var innerBbarP: Double { (0..<r).reduce(0.0) { $0 + zz[$1 * 2 * r + r + $1] } }

    /// Y = TĀᵀ = P + B̄G in coefficients: [G; I].
    var targetCoefficients: [Double] {
        var e = [Double](repeating: 0, count: 2 * r * r)
        for i in 0..<r {
            for j in 0..<r { e[i * r + j] = gram[i * r + j] }
            e[(r + i) * r + i] = 1
        }
        return e
    }

    /// ⟨(ZC)Ā, T⟩ = ⟨ZC, Y⟩.
    func productDot(c: [Double]) -> Double { metric(c, targetCoefficients) }

    /// ‖(ZC)Ā‖² = tr(Cᵀ ZᵀZ C G).
    func productSquared(c: [Double]) -> Double {
        max(0, inner(multiply(zz, c, 2 * r, 2 * r, r), multiply(c, gram, 2 * r, r, r)))
    }

    /// cos((B̄ + Z d)Ā, T); 1 when both are zero, 0 when only one is.
    func cosine(d: [Double], idealNorm: Double) -> Double {
        let c = withIdentity(d)
        let productNorm = productSquared(c: c).squareRoot()
        if productNorm == 0 || idealNorm == 0 { return productNorm == idealNorm ? 1 : 0 }
        return min(1, max(-1, productDot(c: c) / (productNorm * idealNorm)))
    }

    /// Z c = B̄ c_top + P c_bottom, d_out×r, row blocks at a time.
    func combine(_ c: [Double]) -> [Float] {
        var out = [Float](repeating: 0, count: dOut * r)
        let top = c.prefix(r * r).map { Float($0) }, bottom = c.suffix(r * r).map { Float($0) }
        out.withUnsafeMutableBufferPointer { o in
            var row = 0
            while row < dOut {
                let height = min(LoRAFAIR.block, dOut - row), offset = row * r
                for (index, (factor, coefficients)) in [(bbar, top), (p, bottom)].enumerated() {
                    factor.withUnsafeBufferPointer { f in
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(height), Int32(r), Int32(r), 1,
                                    f.baseAddress! + offset, Int32(r), coefficients, Int32(r), index == 0 ? 0 : 1,
                                    o.baseAddress! + offset, Int32(r))
                    }
                }
                row += height
            }
        }
        return out
    }

    /// Proximal gradient descent with backtracking on
    /// F(d) = −cos((B̄+Zd)Ā, T) + μ‖Zd‖,  μ = λ/‖B̄‖, from d = 0.
    func minimiseCosine(idealNorm: Double, lambda: Double, iterations: Int, learningRate: Double) -> (d: [Double], iterations: Int) {
        var d = [Double](repeating: 0, count: 2 * r * r)
        let bbarNorm = self.bbarNorm
        guard bbarNorm > 0, idealNorm > 0, productSquared(c: withIdentity(d)) > 0 else { return (d, 0) }
        let mu = lambda / bbarNorm
        let target = targetCoefficients
        var step = learningRate * bbarNorm * bbarNorm
        func smooth(_ d: [Double]) -> (value: Double, gradient: [Double])? {
            let c = withIdentity(d)
            let squared = productSquared(c: c)
            guard squared > 0 else { return nil }
            let productNorm = squared.squareRoot(), dot = productDot(c: c)
            let cg = multiply(c, gram, 2 * r, r, r)
            var gradient = [Double](repeating: 0, count: 2 * r * r)
            for i in gradient.indices {
                gradient[i] = -target[i] / (productNorm * idealNorm) + dot / (squared * productNorm * idealNorm) * cg[i]
            }
            return (-dot / (productNorm * idealNorm), gradient)
        }
        var done = 0
        for _ in 0..<iterations {
            guard let (value, gradient) = smooth(d) else { break }
            var accepted: [Double]?
            for _ in 0..<60 {
                var trial = zip(d, gradient).map { $0 - step * $1 }
                let trialNorm = norm(trial)
                let shrink = trialNorm > 0 ? max(0, 1 - step * mu / trialNorm) : 0
                trial = trial.map { $0 * shrink }
                let move = zip(trial, d).map { $0 - $1 }
                if let next = smooth(trial),
                   next.value <= value + metric(gradient, move) + metric(move, move) / (2 * step) + 1e-15 * abs(value) {
                    accepted = trial
                    break
                }
                step /= 2
            }
            guard let next = accepted else { break }
            let moved = norm(zip(next, d).map { $0 - $1 })
            d = next
            done += 1
            step *= 1.25
            if moved <= 1e-13 * bbarNorm { break }
        }
        return (d, done)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(LoRAFAIR.self) }
