/// Dense Double-precision references, computed from first principles.
///
/// These build d_out×d_in matrices, so they are for tests, the conformance
/// suite and the demo on small shapes; strategies never call them.
public enum Reference {
    /// The exact FedAvg of products, Σ_k p_k s_k B_k A_k, row-major d_out×d_in.
    public static func idealUpdate(_ round: ModuleRound) -> [Double] {
        var total = [Double](repeating: 0, count: round.dOut * round.dIn)
        for (client, p) in zip(round.clients, round.weights) {
            accumulateProduct(b: client.b, a: client.a, weight: p * client.scaling, into: &total, dIn: round.dIn)
        }
        return total
    }

    /// The update a result applies: s·B·A + U·V, row-major d_out×d_in.
    public static func effectiveUpdate(_ result: AggregationResult, dOut: Int, dIn: Int) -> [Double] {
        var total = [Double](repeating: 0, count: dOut * dIn)
        result.b.withView { b in result.a.withView { a in
            accumulateProduct(b: b, a: a, weight: result.scaling, into: &total, dIn: dIn)
        } }
        addResidual(of: result, into: &total, dIn: dIn)
        return total
    }

    /// total += U·V of the result's base residual, if it has one.
    public static func addResidual(of result: AggregationResult, into total: inout [Double], dIn: Int) {
        guard let residual = result.residual else { return }
        residual.u.withView { u in residual.v.withView { v in
            accumulateProduct(b: u, a: v, weight: 1, into: &total, dIn: dIn)
        } }
    }

    /// What client `k` starts the next round with: ``clientUpdate(_:client:rank:dOut:dIn:)``
    /// plus the shared base residual U·V.
    public static func receivedUpdate(_ result: AggregationResult, client k: Int, rank: Int, dOut: Int, dIn: Int) -> [Double] {
        var total = clientUpdate(result, client: k, rank: rank, dOut: dOut, dIn: dIn)
        addResidual(of: result, into: &total, dIn: dIn)
        return total
    }

    /// The update client `k` applies from a result: its payload, or the first
    /// r_k slots of the global factors (the residual is shared and excluded).
    public static func clientUpdate(_ result: AggregationResult, client k: Int, rank: Int, dOut: Int, dIn: Int) -> [Double] {
        var total = [Double](repeating: 0, count: dOut * dIn)
        if let payload = result.clientPayloads?[k] {
            payload.b.withView { b in payload.a.withView { a in
                accumulateProduct(b: b, a: a, weight: payload.scaling, into: &total, dIn: dIn)
            } }
            return total
        }
        let r = min(rank, result.rank)
        for i in 0..<dOut {
            for t in 0..<r {
                let bv = Double(result.b[i, t]) * result.scaling
                if bv == 0 { continue }
                for j in 0..<dIn { total[i * dIn + j] += bv * Double(result.a[t, j]) }
            }
        }
        return total
    }

    /// total += weight · B·A in Double.
    public static func accumulateProduct(b: MatrixView, a: MatrixView, weight: Double, into total: inout [Double], dIn: Int) {
        for i in 0..<b.rows {
            for t in 0..<b.cols {
                let bv = Double(b[i, t]) * weight
                if bv == 0 { continue }
                for j in 0..<dIn { total[i * dIn + j] += bv * Double(a[t, j]) }
            }
        }
    }

    /// ‖x‖_F in Double.
    public static func norm(_ x: [Double]) -> Double { x.reduce(0) { $0 + $1 * $1 }.squareRoot() }

    /// ‖x − y‖_F / ‖y‖_F (‖x − y‖_F when y is zero).
    public static func relativeError(_ x: [Double], _ y: [Double]) -> Double {
        precondition(x.count == y.count, "relativeError needs equal lengths")
        var difference = 0.0
        for i in x.indices { difference += (x[i] - y[i]) * (x[i] - y[i]) }
        let scale = norm(y)
        return scale > 0 ? difference.squareRoot() / scale : difference.squareRoot()
    }

    /// Cosine similarity ⟨x, y⟩ / (‖x‖‖y‖).
    public static func cosine(_ x: [Double], _ y: [Double]) -> Double {
        var dot = 0.0
        for i in x.indices { dot += x[i] * y[i] }
        let scale = norm(x) * norm(y)
        return scale > 0 ? dot / scale : 1
    }
}
