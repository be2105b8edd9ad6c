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
/// The pivot m is the client of largest weight. Clients without samples, and
/// clients whose rescaled A equals the pivot's bit for bit (a shared frozen A,
/// FFA-LoRA's setting), contribute no block, so such rounds get no residual.
///
/// Modes (`residual=`): `factored` (default) returns U, V as above;
/// `dense` multiplies them out and returns U = I, V = ΔW_res (or U = ΔW_res,
/// V = I when d_out > d_in), the rank-min(d_out, d_in) form the official code
/// uses implicitly; `compressed` returns the truncated SVD of ΔW_res, keeping
/// at most `residual_rank` singular values (0: no cap) and the fewest that
/// keep `residual_energy` of ‖ΔW_res‖², through the exact factored SVD
/// (`LowRank.factoredSVD`: QR of the stacks, a q×q core SVD) without forming
/// ΔW_res, and reports the dropped energy.
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
        var others = active.filter { $0 != pivot }

        let r = round.clients[0].rank, dOut = round.dOut, dIn = round.dIn
        // Every entry is written below; skipping the zero fill saves a pass over the output.
        // U and V go straight into matrix storage, which the plugin kit hands to the host without a copy.
        var a = Self.uninitialized(r * dIn), b = Self.uninitialized(dOut * r)
        var nonzero = [Bool](repeating: false, count: others.count)

        // Pass over the A factors: Ā and the rows of V, chunk by chunk so each
        // client's chunk is read from memory once.
        let aSources = active.map { round.clients[$0].a.base }
        let aWeights = active.map { Float(weights[$0] * rescale[$0]) }
        var v = Matrix(rows: others.count * r, cols: dIn, initializingWith: { vOut in
            a.withUnsafeMutableBufferPointer { abar in
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
                        if !nonzero[slot] { nonzero[slot] = (0..<length).contains { out[$0] != 0 } }
                    }
                    start += length
                }
            }
        })
        // A client whose rescaled A equals the pivot's (a shared, frozen A with
        // one scaling) adds nothing: drop its block instead of returning zeros.
        if nonzero.contains(false) {
            let blockSize = r * dIn
            let keptSlots = others.indices.filter { nonzero[$0] }
            v = v.withUnsafeBufferPointer { full in
                Matrix(rows: keptSlots.count * r, cols: dIn, initializingWith: { kept in
                    for (target, slot) in keptSlots.enumerated() {
                        (kept.baseAddress! + target * blockSize).initialize(from: full.baseAddress! + slot * blockSize, count: blockSize)
                    }
                })
            }
            others = keptSlots.map { others[$0] }
        }
        let q = others.count * r

        // Pass over the B factors: B̄ and U, rows at a time for the same reason.
        let bSources = active.map { round.clients[$0].b.base }
        let u = Matrix(rows: dOut, cols: q, initializingWith: { uOut in
            b.withUnsafeMutableBufferPointer { bbar in
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
        })

        let average = (a: Matrix(rows: r, cols: dIn, values: a), b: Matrix(rows: dOut, cols: r, values: b))
        var diagnostics: [Diagnostic] = []
        guard q > 0 else {
            // One contributing client, or a shared A: averaging loses nothing.
            diagnostics.append(Diagnostic("residual_rank", 0))
            if reportNorms { diagnostics.append(Diagnostic("residual_norm_relative", 0)) }
            if mode == .compressed { diagnostics += [Diagnostic("residual_dropped_energy", 0), Diagnostic("residual_error_relative", 0)] }
            return AggregationResult(a: average.a, b: average.b, scaling: s, diagnostics: diagnostics)
        }

        // Compression gets ‖U·V‖² exactly from its spectrum; otherwise it takes
        // the q×q Gram matrices, the only diagnostic that costs more than a pass.
        var svd: LowRank.Factorization?
        if mode == .compressed {
            if let culprit = round.firstNonFiniteClient() {
                // LAPACK would fail on them with a less helpful message.
                throw AggregationError.invalidInput("module '\(round.module)', client '\(culprit.client)': \(culprit.factor) contains NaN or infinite values")
            }
            svd = try u.withUnsafeBufferPointer { up in
                try v.withUnsafeBufferPointer { vp in
                    let term = LowRank.Term(weight: 1, b: MatrixView(rows: dOut, cols: q, base: up.baseAddress!),
                                            a: MatrixView(rows: q, cols: dIn, base: vp.baseAddress!))
                    return try LowRank.factoredSVD(terms: [term], dOut: dOut, dIn: dIn, keep: min(q, dOut, dIn))
                }
            }
        }
        var norms: Norms?
        if let svd {
            norms = Self.norms(residualSquared: svd.totalEnergy, u: u, v: v, abar: a, bbar: b, s: s, r: r, q: q, dOut: dOut, dIn: dIn)
        } else if reportNorms {
            let gramU = u.withUnsafeBufferPointer { Kernels.gram($0, rows: dOut, cols: q, ofColumns: true) }
            let gramV = v.withUnsafeBufferPointer { Kernels.gram($0, rows: q, cols: dIn, ofColumns: false) }
            let squared = max(0, zip(gramU, gramV).reduce(0) { $0 + $1.0 * $1.1 })
            norms = Self.norms(residualSquared: squared, u: u, v: v, abar: a, bbar: b, s: s, r: r, q: q, dOut: dOut, dIn: dIn)
        }

        let residual: FactoredResidual
        switch mode {
        case .factored:
            residual = FactoredResidual(u: u, v: v)
            diagnostics.append(Diagnostic("residual_rank", Double(q)))
        case .dense:
            residual = Self.densify(u: u, v: v, q: q, dOut: dOut, dIn: dIn)
            diagnostics.append(Diagnostic("residual_rank", Double(residual.rank)))
        case .compressed:
            let compressed = Self.truncate(svd!, dOut: dOut, dIn: dIn, rankCap: rankCap, energy: energy)
            residual = compressed.residual
            let total = norms!.residual * norms!.residual
            diagnostics.append(Diagnostic("residual_rank", Double(residual.rank)))
            diagnostics.append(Diagnostic("residual_dropped_energy", total > 0 ? min(1, compressed.dropped / total) : 0))
            diagnostics.append(Diagnostic("residual_error_relative",
                                          norms!.ideal > 0 ? compressed.dropped.squareRoot() / norms!.ideal : compressed.dropped.squareRoot()))
        }
        if let norms, reportNorms {
            diagnostics.append(Diagnostic("residual_norm_relative", norms.ideal > 0 ? norms.residual / norms.ideal : norms.residual))
        }
        return AggregationResult(a: average.a, b: average.b, scaling: s,
                                 residual: residual.rank > 0 ? residual : nil, diagnostics: diagnostics)
    }

    /// A Float array of `count` entries that the caller overwrites entirely.
    static func uninitialized(_ count: Int) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { _, initialized in initialized = count }
    }

    /// Elements per chunk of the fused passes: the clients' chunks stay in L1/L2.
    static let chunk = 4096

    /// Frobenius norms of the residual and of the ideal update Σ p_k s_k B_k A_k.
    struct Norms {
        var residual: Double
        var ideal: Double
    }

    /// ‖U·V‖ (given squared) and ‖s·B̄Ā + U·V‖ = √(s²‖B̄Ā‖² + 2s⟨B̄Ā, U·V⟩ + ‖U·V‖²),
    /// from r×r Gram matrices and r×q products only.
    static func norms(residualSquared: Double, u: Matrix, v: Matrix, abar: [Float], bbar: [Float],
                      s: Double, r: Int, q: Int, dOut: Int, dIn: Int) -> Norms {
        let gramB = bbar.withUnsafeBufferPointer { Kernels.gram($0, rows: dOut, cols: r, ofColumns: true) }
        let gramA = abar.withUnsafeBufferPointer { Kernels.gram($0, rows: r, cols: dIn, ofColumns: false) }
        let averageSquared = zip(gramB, gramA).reduce(0) { $0 + $1.0 * $1.1 }
        // ⟨B̄Ā, UV⟩ = Σ (B̄ᵀU) ∘ (ĀVᵀ), accumulated over blocks of 64 along d:
        // OpenBLAS's small-matrix kernel on the blocks measured as fast as or
        // faster than one call (the host runs OpenBLAS single-threaded, so
        // keeping its threads out is no longer the reason).
        var bu = [Float](repeating: 0, count: r * q), av = [Float](repeating: 0, count: r * q)
        let depth = 64
        bbar.withUnsafeBufferPointer { bp in u.withUnsafeBufferPointer { up in bu.withUnsafeMutableBufferPointer { out in
            for start in stride(from: 0, to: dOut, by: depth) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(r), Int32(q), Int32(min(depth, dOut - start)), 1,
                            bp.baseAddress! + start * r, Int32(r), up.baseAddress! + start * q, Int32(q),
                            start == 0 ? 0 : 1, out.baseAddress!, Int32(q))
            }
        } } }
        abar.withUnsafeBufferPointer { ap in v.withUnsafeBufferPointer { vp in av.withUnsafeMutableBufferPointer { out in
            for start in stride(from: 0, to: dIn, by: depth) {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(r), Int32(q), Int32(min(depth, dIn - start)), 1,
                            ap.baseAddress! + start, Int32(dIn), vp.baseAddress! + start, Int32(dIn),
                            start == 0 ? 0 : 1, out.baseAddress!, Int32(q))
            }
        } } }
        let cross = zip(bu, av).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        let idealSquared = s * s * averageSquared + 2 * s * cross + residualSquared
        return Norms(residual: residualSquared.squareRoot(), ideal: max(0, idealSquared).squareRoot())
    }

    /// U·V multiplied out, paired with an identity on its shorter side.
    static func densify(u: Matrix, v: Matrix, q: Int, dOut: Int, dIn: Int) -> FactoredResidual {
        var dense = [Float](repeating: 0, count: dOut * dIn)
        u.withUnsafeBufferPointer { up in v.withUnsafeBufferPointer { vp in dense.withUnsafeMutableBufferPointer { out in
            Kernels.gemm(up.baseAddress!, vp.baseAddress!, out.baseAddress!, m: dOut, n: dIn, k: q)
        } } }
        let side = min(dOut, dIn)
        let identity = Matrix(rows: side, cols: side) { $0 == $1 ? 1 : 0 }
        let product = Matrix(rows: dOut, cols: dIn, values: dense)
        return dOut <= dIn ? FactoredResidual(u: identity, v: product) : FactoredResidual(u: product, v: identity)
    }

    /// The truncation of an exact SVD of U·V: the fewest leading singular
    /// values that keep `energy` of ‖U·V‖², at most `rankCap` of them (0: no
    /// cap), never ones at round-off level (σ ≤ 10⁻⁶ σ_max: below what Float32
    /// factors resolve). Returns U' = U_k Σ_k, V' = V_kᵀ and Σ of the dropped σ².
    static func truncate(_ svd: LowRank.Factorization, dOut: Int, dIn: Int, rankCap: Int, energy: Double)
        -> (residual: FactoredResidual, dropped: Double) {
        let spectrum = svd.spectrum
        let total = svd.totalEnergy, floor = (spectrum.first ?? 0) * 1e-6
        var keep = 0, running = 0.0
        for sigma in spectrum {
            if rankCap > 0 && keep >= rankCap { break }
            if !(sigma > floor) { break }
            if energy < 1 && running >= energy * total { break }
            running += sigma * sigma
            keep += 1
        }
        let columns = svd.u.cols
        var u = [Float](repeating: 0, count: dOut * keep)
        for i in 0..<dOut {
            for c in 0..<keep { u[i * keep + c] = Float(Double(svd.u.values[i * columns + c]) * spectrum[c]) }
        }
        let v = Array(svd.vt.values.prefix(keep * dIn))
        return (FactoredResidual(u: Matrix(rows: dOut, cols: keep, values: u), v: Matrix(rows: keep, cols: dIn, values: v)),
                svd.tailEnergy(after: keep))
    }
}

@_cdecl("lora_agg_plugin_entry") public func loraAggPluginEntry() -> UnsafeRawPointer { export(FedExLoRA.self) }
