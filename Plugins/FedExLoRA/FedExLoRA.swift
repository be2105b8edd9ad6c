// fedex-lora — FedEx-LoRA [Singhal et al., 2024], arXiv:2410.09432.
// Goals, in order: exact (the base-weight residual carries what averaging loses);
// no d_out×d_in matrix unless asked for; speed (two passes over the client factors).

import COpenBLAS
import LoraAggPluginKit

/// Averages A and B like FedIT and returns, for the base weight, the exact
/// residual that averaging the factors loses, kept factored.
///
/// ```
/// p_k = n_k / Σ n_j,   s = common scaling,   c_k = √(s_k / s)
/// Ã_k = c_k A_k,   B̃_k = c_k B_k               (s·B̃_k Ã_k = s_k B_k A_k)
/// Ā = Σ p_k Ã_k,   B̄ = Σ p_k B̃_k,   global adapter s·B̄Ā
/// residual  ΔW_res = Σ p_k s_k B_k A_k − s·B̄Ā
///                  = s Σ_k p_k (B̃_k − B̄)(Ã_k − Ā)                 (Σ p_k (B̃_k − B̄) = 0)
///                  = Σ_{k≠m} [s p_k (B̃_k − B̄)] · [Ã_k − Ã_m]      (m: the pivot client)
/// U = [s p_k (B̃_k − B̄)]_{k≠m}   d_out × (K−1)r
/// V = [Ã_k − Ã_m]_{k≠m}         (K−1)r × d_in
/// s·B̄Ā + U·V = Σ p_k s_k B_k A_k   exactly
/// ```
///
/// The second line holds because Σ p_k B̃_k = B̄ and Σ p_k Ã_k = Ā; the third
/// substitutes p_m(B̃_m − B̄) = −Σ_{k≠m} p_k(B̃_k − B̄). The residual's rank is
/// therefore at most (K−1)r, two blocks fewer than the textbook stacking
/// [p_1 s_1 B_1 … p_K s_K B_K, −s B̄]·[A_1; …; A_K; Ā] of rank (K+1)r, and
/// it has no cancellation between the large terms Σ p_k s_k B_k A_k and s B̄Ā,
/// so its Float32 round-off is relative to the residual, not to the update.
/// The pivot m is the client of largest weight.
///
/// Modes (`residual=`): `factored` (default) returns U, V as above;
/// `dense` multiplies them out and returns U = I, V = ΔW_res (or U = ΔW_res,
/// V = I when d_out > d_in), the rank-min(d_out, d_in) form the official code
/// uses implicitly; `compressed` returns the truncated SVD of ΔW_res, keeping
/// at most `residual_rank` singular values (0: no cap) and the fewest that
/// keep `residual_energy` of ‖ΔW_res‖², computed from q×q Gram matrices
/// without forming ΔW_res, and reports the dropped energy.
///
/// Deviations from the official code (`fed_agg.py::aggregate_models_ours`):
/// weights are sample shares p_k (the code's 1/K is the equal-samples case);
/// the residual is factored rather than a dense d_out×d_in matrix; clients
/// with different scalings are rescaled to a common s (the code assumes one).
/// Bug avoided: the code adds transpose(s·ΔW_res) to the base weight, which is
/// right only for GPT-2 `Conv1D` layers; for `nn.Linear` (d_out×d_in) it is a
/// silent error. Here U·V is always d_out×d_in, PEFT's `nn.Linear` layout.
/// Equal ranks only, like the paper.
struct FedExLoRA: Strategy {
    static let info = StrategyInfo(
        name: "fedex-lora",
        version: "1.0.0",
        summary: "Averages A and B and returns the exact residual for the base weight, factored with rank at most (K-1)r.",
        citation: "Singhal, Ponkshe, Vepakomma, FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models, ACL 2025, arXiv:2410.09432",
        description: """
            Ā = Σ p_k c_k A_k and B̄ = Σ p_k c_k B_k with p_k = n_k/Σn and c_k = √(s_k/s); the base weight receives \
            the residual Σ p_k s_k B_k A_k − s·B̄Ā as U·V with U = [s p_k (c_k B_k − B̄)] and V = [c_k A_k − c_m A_m] over \
            the clients k ≠ m (m the largest-weight client), rank at most (K−1)r, so s·B̄Ā + U·V is exact. \
            residual=dense multiplies U·V out (rank min(d_out, d_in)); residual=compressed keeps a truncated SVD of it \
            (residual_rank, residual_energy) and reports the dropped energy. \
            Deviations from the official code: sample weights instead of 1/K, a factored instead of a dense residual, \
            no transpose of the residual for nn.Linear layers (the official code's bug). Equal ranks only.
            """,
        capabilities: [.exact, .baseResidual],
        parameters: [
            .choice("residual", default: "factored", choices: ["factored", "dense", "compressed"],
                    help: "How the base-weight residual is returned: factored U·V of rank ≤ (K−1)r, dense (rank min(d_out, d_in)), or a truncated SVD"),
            .integer("residual_rank", default: 0, minimum: 0,
                     help: "With residual=compressed: keep at most this many singular values (0: no cap)"),
            .number("residual_energy", default: 1, minimum: 0, maximum: 1,
                    help: "With residual=compressed: keep the fewest singular values holding this share of the residual's squared Frobenius norm (1: all that are not round-off)"),
            .boolean("diagnostics", default: true,
                     help: "Report the residual's norm relative to the ideal update (costs two q×q Gram matrices, q = (K−1)r)"),
        ])

    enum Mode: String { case factored, dense, compressed }

    let mode: Mode
    let rankCap: Int
    let energy: Double
    let reportNorms: Bool

    init(parameters: StrategyParameters) throws {
        mode = Mode(rawValue: parameters.string("residual")) ?? .factored
        rankCap = parameters.integer("residual_rank")
        energy = parameters.number("residual_energy")
        reportNorms = parameters.boolean("diagnostics")
        if mode != .compressed && (rankCap != 0 || energy != 1) {
            throw AggregationError.invalidConfig("parameters 'residual_rank' and 'residual_energy' need residual=compressed")
        }
        if energy == 0 {
            throw AggregationError.invalidConfig("invalid value '0' for parameter 'residual_energy': nothing would be kept; expected a share in (0, 1]")
        }
    }

    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        try round.requireEqualRanks(strategy: Self.info.name)
        let weights = round.weights
        let s = round.commonScaling
        // Clients without samples contribute nothing; leaving them out keeps the rank down.
        let active = round.clients.indices.filter { weights[$0] > 0 }
        let rescale = round.clients.indices.map { round.factorRescale($0) }
        let pivot = active.max { weights[$0] < weights[$1] || (weights[$0] == weights[$1] && $0 > $1) }!
        let others = active.filter { $0 != pivot }

        let r = round.clients[0].rank, dOut = round.dOut, dIn = round.dIn
        let q = others.count * r
        var a = [Float](repeating: 0, count: r * dIn)
        var b = [Float](repeating: 0, count: dOut * r)
        var u = [Float](repeating: 0, count: dOut * q)
        var v = [Float](repeating: 0, count: q * dIn)

        // Pass over the A factors: Ā and the rows of V, chunk by chunk so each
        // client's chunk is read from memory once.
        let aSources = active.map { round.clients[$0].a.base }
        let aWeights = active.map { Float(weights[$0] * rescale[$0]) }
        a.withUnsafeMutableBufferPointer { abar in
            v.withUnsafeMutableBufferPointer { vOut in
                let count = r * dIn
                let pivotA = round.clients[pivot].a.base, pivotC = Float(rescale[pivot])
                var start = 0
                while start < count {
                    let length = min(Self.chunk, count - start)
                    Kernels.weightedSum(aSources.map { $0 + start }, weights: aWeights, count: length,
                                        into: abar.baseAddress! + start)
                    let x0 = pivotA + start
                    for (slot, k) in others.enumerated() {
                        let x = round.clients[k].a.base + start, c = Float(rescale[k])
                        let out = vOut.baseAddress! + slot * count + start
                        for i in 0..<length { out[i] = c * x[i] - pivotC * x0[i] }
                    }
                    start += length
                }
            }
        }

        // Pass over the B factors: B̄ and U, rows at a time for the same reason.
        let bSources = active.map { round.clients[$0].b.base }
        b.withUnsafeMutableBufferPointer { bbar in
            u.withUnsafeMutableBufferPointer { uOut in
                let rowsPerChunk = max(1, Self.chunk / r)
                let columnWeights = others.map { Float(s * weights[$0]) }
                let columnRescale = others.map { Float(rescale[$0]) }
                var row = 0
                while row < dOut {
                    let rows = min(rowsPerChunk, dOut - row)
                    let offset = row * r
                    let mean = bbar.baseAddress! + offset
                    Kernels.weightedSum(bSources.map { $0 + offset }, weights: aWeights, count: rows * r, into: mean)
                    for (slot, k) in others.enumerated() {
                        let x = round.clients[k].b.base + offset
                        let w = columnWeights[slot], c = columnRescale[slot]
                        var out = uOut.baseAddress! + row * q + slot * r
                        for i in 0..<rows {
                            let xi = x + i * r, mi = mean + i * r
                            for t in 0..<r { out[t] = w * (c * xi[t] - mi[t]) }
                            out += q
                        }
                    }
                    row += rows
                }
            }
        }

        let average = (a: Matrix(rows: r, cols: dIn, values: a), b: Matrix(rows: dOut, cols: r, values: b))
        var diagnostics: [Diagnostic] = []
        guard q > 0 else {
            // One contributing client: averaging loses nothing.
            diagnostics.append(Diagnostic("residual_rank", 0))
            if reportNorms { diagnostics.append(Diagnostic("residual_norm_relative", 0)) }
            if mode == .compressed { diagnostics += [Diagnostic("residual_dropped_energy", 0), Diagnostic("residual_error_relative", 0)] }
            return AggregationResult(a: average.a, b: average.b, scaling: s, diagnostics: diagnostics)
        }

        var norms: Norms?
        var gramU: [Double] = [], gramV: [Double] = []
        if reportNorms || mode == .compressed {
            // Truncation needs the small eigenvalues, which Float Grams bury in round-off.
            let precise = mode == .compressed
            gramU = Self.gram(u, rows: dOut, cols: q, ofColumns: true, double: precise)
            gramV = Self.gram(v, rows: q, cols: dIn, ofColumns: false, double: precise)
            norms = Self.norms(gramU: gramU, gramV: gramV, u: u, v: v, abar: a, bbar: b, s: s, r: r, q: q, dOut: dOut, dIn: dIn)
        }

        let residual: FactoredResidual
        switch mode {
        case .factored:
            residual = FactoredResidual(u: Matrix(rows: dOut, cols: q, values: u), v: Matrix(rows: q, cols: dIn, values: v))
            diagnostics.append(Diagnostic("residual_rank", Double(q)))
        case .dense:
            residual = Self.densify(u: u, v: v, q: q, dOut: dOut, dIn: dIn)
            diagnostics.append(Diagnostic("residual_rank", Double(residual.rank)))
        case .compressed:
            let compressed = try Self.compress(u: u, v: v, gramU: gramU, gramV: gramV, q: q, dOut: dOut, dIn: dIn,
                                               rankCap: rankCap, energy: energy, module: round.module)
            residual = compressed.residual
            let total = norms!.residual * norms!.residual
            let dropped = max(0, compressed.dropped)
            diagnostics.append(Diagnostic("residual_rank", Double(residual.rank)))
            diagnostics.append(Diagnostic("residual_dropped_energy", total > 0 ? min(1, dropped / total) : 0))
            diagnostics.append(Diagnostic("residual_error_relative", norms!.ideal > 0 ? dropped.squareRoot() / norms!.ideal : dropped.squareRoot()))
        }
        if let norms, reportNorms {
            diagnostics.append(Diagnostic("residual_norm_relative", norms.ideal > 0 ? norms.residual / norms.ideal : norms.residual))
        }
        return AggregationResult(a: average.a, b: average.b, scaling: s,
                                 residual: residual.rank > 0 ? residual : nil, diagnostics: diagnostics)
    }

    /// Elements per chunk of the fused passes: the clients' chunks stay in L1/L2.
    static let chunk = 4096

    /// Frobenius norms of the residual and of the ideal update Σ p_k s_k B_k A_k.
    struct Norms {
        var residual: Double
        var ideal: Double
    }

    /// ‖U·V‖ = √tr((UᵀU)(VVᵀ)) and ‖s·B̄Ā + U·V‖, from Gram matrices and
    /// r×q products only.
    static func norms(gramU: [Double], gramV: [Double], u: [Float], v: [Float], abar: [Float], bbar: [Float],
                      s: Double, r: Int, q: Int, dOut: Int, dIn: Int) -> Norms {
        let residualSquared = max(0, zip(gramU, gramV).reduce(0) { $0 + $1.0 * $1.1 })
        let gramB = gram(bbar, rows: dOut, cols: r, ofColumns: true)
        let gramA = gram(abar, rows: r, cols: dIn, ofColumns: false)
        let averageSquared = zip(gramB, gramA).reduce(0) { $0 + $1.0 * $1.1 }
        // ⟨B̄Ā, UV⟩ = Σ (B̄ᵀU) ∘ (ĀVᵀ).
        var bu = [Float](repeating: 0, count: r * q), av = [Float](repeating: 0, count: r * q)
        bbar.withUnsafeBufferPointer { bp in u.withUnsafeBufferPointer { up in bu.withUnsafeMutableBufferPointer { out in
            Kernels.gemm(bp.baseAddress!, up.baseAddress!, out.baseAddress!, m: r, n: q, k: dOut, transposeA: true)
        } } }
        abar.withUnsafeBufferPointer { ap in v.withUnsafeBufferPointer { vp in av.withUnsafeMutableBufferPointer { out in
            Kernels.gemm(ap.baseAddress!, vp.baseAddress!, out.baseAddress!, m: r, n: q, k: dIn, transposeB: true)
        } } }
        let cross = zip(bu, av).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        let idealSquared = s * s * averageSquared + 2 * s * cross + residualSquared
        return Norms(residual: residualSquared.squareRoot(), ideal: max(0, idealSquared).squareRoot())
    }

    /// The Gram matrix of the columns (XᵀX) or of the rows (XXᵀ) of a
    /// row-major Float matrix, through `ssyrk` (or `dsyrk` on a widened copy
    /// when `double`), as a symmetric Double matrix.
    static func gram(_ x: [Float], rows: Int, cols: Int, ofColumns: Bool, double: Bool = false) -> [Double] {
        let n = ofColumns ? cols : rows, depth = ofColumns ? rows : cols
        let transpose = ofColumns ? CblasTrans : CblasNoTrans
        var result = [Double](repeating: 0, count: n * n)
        if double {
            let wide = x.map { Double($0) }
            cblas_dsyrk(CblasRowMajor, CblasUpper, transpose, Int32(n), Int32(depth), 1, wide, Int32(cols), 0, &result, Int32(n))
        } else {
            var g = [Float](repeating: 0, count: n * n)
            cblas_ssyrk(CblasRowMajor, CblasUpper, transpose, Int32(n), Int32(depth), 1, x, Int32(cols), 0, &g, Int32(n))
            for i in 0..<(n * n) { result[i] = Double(g[i]) }
        }
        for i in 0..<n { for j in (i + 1)..<max(i + 1, n) { result[j * n + i] = result[i * n + j] } }
        return result
    }

    /// U·V multiplied out, paired with an identity on its shorter side.
    static func densify(u: [Float], v: [Float], q: Int, dOut: Int, dIn: Int) -> FactoredResidual {
        var dense = [Float](repeating: 0, count: dOut * dIn)
        u.withUnsafeBufferPointer { up in v.withUnsafeBufferPointer { vp in dense.withUnsafeMutableBufferPointer { out in
            Kernels.gemm(up.baseAddress!, vp.baseAddress!, out.baseAddress!, m: dOut, n: dIn, k: q)
        } } }
        let side = min(dOut, dIn)
        let identity = Matrix(rows: side, cols: side) { $0 == $1 ? 1 : 0 }
        let product = Matrix(rows: dOut, cols: dIn, values: dense)
        return dOut <= dIn ? FactoredResidual(u: identity, v: product) : FactoredResidual(u: product, v: identity)
    }

    /// The truncated SVD of U·V from its Gram matrices:
    ///
    /// ```
    /// VVᵀ = Q Λ Qᵀ                   (drop round-off eigenvalues)
    /// U·V = (U Q Λ^½)(Λ^-½ Qᵀ V)      the right factor has orthonormal rows
    /// Λ^½ Qᵀ (UᵀU) Q Λ^½ = W Σ² Wᵀ   so U Q Λ^½ W has orthogonal columns of norms σ
    /// U' = U·(Q Λ^½ W_k),  V' = (W_kᵀ Λ^-½ Qᵀ)·V
    /// ```
    ///
    /// Only q×q eigenproblems and two thin GEMMs; the dropped energy is Σ of
    /// the dropped σ². Accurate to about √ε of the largest σ², ample for a
    /// truncation that drops a visible share of the energy.
    static func compress(u: [Float], v: [Float], gramU: [Double], gramV: [Double], q: Int, dOut: Int, dIn: Int,
                         rankCap: Int, energy: Double, module: String) throws -> (residual: FactoredResidual, dropped: Double) {
        let (lambda, basis) = try symmetricEigen(gramV, n: q, module: module)
        let lambdaMax = lambda.last ?? 0
        let kept = (0..<q).filter { lambda[$0] > lambdaMax * 1e-12 && lambda[$0] > 0 }
        let m = kept.count
        guard m > 0 else {
            return (FactoredResidual(u: Matrix(zeros: dOut, 0), v: Matrix(zeros: 0, dIn)), 0)
        }
        // T = Q_kept Λ^½ (q×m), column j scaled by √λ_j.
        var t = [Double](repeating: 0, count: q * m)
        for i in 0..<q { for (j, e) in kept.enumerated() { t[i * m + j] = basis[i * q + e] * lambda[e].squareRoot() } }
        // C = Tᵀ (UᵀU) T  (m×m).
        var gt = [Double](repeating: 0, count: q * m), core = [Double](repeating: 0, count: m * m)
        Kernels.gemm(gramU, t, &gt, m: q, n: m, k: q)
        Kernels.gemm(t, gt, &core, m: m, n: m, k: q, transposeA: true)
        let (sigmaSquared, w) = try symmetricEigen(core, n: m, module: module)
        // Descending order of σ².
        let order = (0..<m).reversed().map { $0 }
        let total = sigmaSquared.reduce(0) { $0 + max(0, $1) }
        let floor = (sigmaSquared.last ?? 0) * 1e-12
        var keep = 0, running = 0.0
        for index in order {
            if rankCap > 0 && keep >= rankCap { break }
            if sigmaSquared[index] <= floor { break }
            if energy < 1 && running >= energy * total { break }
            running += sigmaSquared[index]
            keep += 1
        }
        let dropped = max(0, total - running)
        guard keep > 0 else {
            return (FactoredResidual(u: Matrix(zeros: dOut, 0), v: Matrix(zeros: 0, dIn)), dropped)
        }
        // Left map L = T W_k (q×keep); right map R = W_kᵀ Λ^-1 Tᵀ = W_kᵀ Λ^-½ Qᵀ (keep×q).
        var left = [Float](repeating: 0, count: q * keep), right = [Float](repeating: 0, count: keep * q)
        for i in 0..<q {
            for (column, index) in order.prefix(keep).enumerated() {
                var l = 0.0, rr = 0.0
                for (j, e) in kept.enumerated() {
                    l += t[i * m + j] * w[j * m + index]
                    rr += w[j * m + index] * basis[i * q + e] / lambda[e].squareRoot()
                }
                left[i * keep + column] = Float(l)
                right[column * q + i] = Float(rr)
            }
        }
        var newU = [Float](repeating: 0, count: dOut * keep), newV = [Float](repeating: 0, count: keep * dIn)
        Kernels.gemm(u, left, &newU, m: dOut, n: keep, k: q)
        Kernels.gemm(right, v, &newV, m: keep, n: dIn, k: q)
        return (FactoredResidual(u: Matrix(rows: dOut, cols: keep, values: newU),
                                 v: Matrix(rows: keep, cols: dIn, values: newV)), dropped)
    }

    /// Eigenvalues (ascending) and row-major eigenvectors (column j is the
    /// j-th vector) of a symmetric n×n matrix, through LAPACK `dsyevd`.
    static func symmetricEigen(_ matrix: [Double], n: Int, module: String) throws -> ([Double], [Double]) {
        // Symmetric, so row- and column-major agree on input; the output
        // vectors are columns in column-major, i.e. rows in row-major: transpose back.
        var a = matrix, w = [Double](repeating: 0, count: n)
        var order = Int32(n), lda = Int32(max(1, n)), info: Int32 = 0
        var workSize = 0.0, iworkSize: Int32 = 0, query: Int32 = -1
        dsyevd_("V", "U", &order, &a, &lda, &w, &workSize, &query, &iworkSize, &query, &info)
        var lwork = Int32(workSize), liwork = iworkSize
        var work = [Double](repeating: 0, count: Int(lwork)), iwork = [Int32](repeating: 0, count: Int(liwork))
        dsyevd_("V", "U", &order, &a, &lda, &w, &work, &lwork, &iwork, &liwork, &info)
        if info != 0 {
            throw AggregationError.internalError("module '\(module)': eigen-decomposition of a \(n)x\(n) Gram matrix failed (LAPACK dsyevd info \(info))")
        }
        var vectors = [Double](repeating: 0, count: n * n)
        for i in 0..<n { for j in 0..<n { vectors[i * n + j] = a[j * n + i] } }
        return (w, vectors)
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FedExLoRA.self) }
