/// A named diagnostic number reported by a strategy, e.g. `cosine_after`.
public struct Diagnostic: Sendable, Equatable {
    public var name: String
    public var value: Double
    public init(_ name: String, _ value: Double) {
        self.name = name
        self.value = value
    }
}

/// Factors returned to one client when a strategy personalises.
public struct ClientPayload: Sendable, Equatable {
    /// rank×d_in.
    public var a: Matrix
    /// d_out×rank.
    public var b: Matrix
    /// Scaling the client must use with these factors.
    public var scaling: Double
    public init(a: Matrix, b: Matrix, scaling: Double) {
        self.a = a
        self.b = b
        self.scaling = scaling
    }
    /// The rank of the payload.
    public var rank: Int { a.rows }
}

/// A residual for the base weight, kept factored: W0 += u·v (scaling included).
public struct FactoredResidual: Sendable, Equatable {
    /// d_out×q.
    public var u: Matrix
    /// q×d_in.
    public var v: Matrix
    public init(u: Matrix, v: Matrix) {
        self.u = u
        self.v = v
    }
    /// The rank q.
    public var rank: Int { u.cols }
}

/// The outcome of aggregating one module.
///
/// The effective global update is `scaling·b·a + residual.u·residual.v`.
/// Unless `clientPayloads` is set, client k receives the first r_k rank slots
/// of `a` and `b` (rows of A, columns of B).
public struct AggregationResult: Sendable, Equatable {
    /// Global A, rank×d_in.
    public var a: Matrix
    /// Global B, d_out×rank.
    public var b: Matrix
    /// Scaling of the global factors.
    public var scaling: Double
    /// Optional base-weight residual.
    public var residual: FactoredResidual?
    /// Optional per-client factors, in the round's client order.
    public var clientPayloads: [ClientPayload]?
    /// Named diagnostics.
    public var diagnostics: [Diagnostic]

    /// Creates a result.
    public init(a: Matrix, b: Matrix, scaling: Double, residual: FactoredResidual? = nil,
                clientPayloads: [ClientPayload]? = nil, diagnostics: [Diagnostic] = []) {
        self.a = a
        self.b = b
        self.scaling = scaling
        self.residual = residual
        self.clientPayloads = clientPayloads
        self.diagnostics = diagnostics
    }

    /// The global rank R.
    public var rank: Int { a.rows }

    /// The value of a diagnostic, if reported.
    public func diagnostic(_ name: String) -> Double? { diagnostics.first { $0.name == name }?.value }

    /// Whether every number in the result is finite.
    public var isFinite: Bool {
        a.isFinite && b.isFinite && scaling.isFinite
            && (residual.map { $0.u.isFinite && $0.v.isFinite } ?? true)
            && (clientPayloads?.allSatisfy { $0.a.isFinite && $0.b.isFinite && $0.scaling.isFinite } ?? true)
    }

    /// Problems with the result's shapes for a round of the given shape and
    /// clients (empty means consistent).
    public func shapeProblems(dOut: Int, dIn: Int, clientRanks: [Int]) -> [String] {
        var found: [String] = []
        if a.rows < 1 { found.append("global rank is 0") }
        if a.cols != dIn { found.append("A is \(a.rows)x\(a.cols); expected \(a.rows)x\(dIn)") }
        if b.rows != dOut || b.cols != a.rows { found.append("B is \(b.rows)x\(b.cols); expected \(dOut)x\(a.rows)") }
        if !(scaling > 0) { found.append("scaling is \(scaling); expected > 0") }
        if let residual {
            if residual.u.rows != dOut || residual.v.cols != dIn || residual.u.cols != residual.v.rows {
                found.append("residual is (\(residual.u.rows)x\(residual.u.cols))·(\(residual.v.rows)x\(residual.v.cols)); expected (\(dOut)xq)·(qx\(dIn))")
            }
        }
        if let payloads = clientPayloads {
            if payloads.count != clientRanks.count {
                found.append("\(payloads.count) client payloads for \(clientRanks.count) clients")
            }
            for (k, payload) in payloads.enumerated() {
                if payload.a.cols != dIn || payload.b.rows != dOut || payload.b.cols != payload.a.rows {
                    found.append("payload \(k) is (\(payload.b.rows)x\(payload.b.cols))·(\(payload.a.rows)x\(payload.a.cols)); expected (\(dOut)xr)·(rx\(dIn))")
                }
            }
        }
        return found
    }
}
