/// One client's LoRA factors for one module, borrowed for the duration of a call.
///
/// The client's weight update is `scaling * b * a`, with `a` rank×d_in and
/// `b` d_out×rank, exactly as Hugging Face PEFT stores `lora_A` and `lora_B`.
public struct ClientFactors: @unchecked Sendable {
    /// A stable identifier used in messages (the adapter folder, or `client-3`).
    public let id: String
    /// Number of training samples n_k; the weight is n_k / Σ n_j.
    public let samples: Double
    /// PEFT scaling s_k = α/r (or α/√r with rsLoRA).
    public let scaling: Double
    /// A_k, rank×d_in.
    public let a: MatrixView
    /// B_k, d_out×rank.
    public let b: MatrixView

    /// Creates a client from borrowed factors.
    public init(id: String, samples: Double, scaling: Double, a: MatrixView, b: MatrixView) {
        self.id = id
        self.samples = samples
        self.scaling = scaling
        self.a = a
        self.b = b
    }

    /// The LoRA rank r_k.
    public var rank: Int { a.rows }
}

/// The clients of one round for one module: the input of ``Aggregator/aggregate(_:)``.
public struct ModuleRound: @unchecked Sendable {
    /// The module's name, e.g. `model.layers.0.self_attn.q_proj`.
    public let module: String
    /// Output dimension (rows of B).
    public let dOut: Int
    /// Input dimension (columns of A).
    public let dIn: Int
    /// Round number, from 0.
    public let roundIndex: Int
    /// The clients taking part, in the caller's order.
    public let clients: [ClientFactors]

    /// Creates a round from borrowed client factors.
    public init(module: String, dOut: Int, dIn: Int, roundIndex: Int = 0, clients: [ClientFactors]) {
        self.module = module
        self.dOut = dOut
        self.dIn = dIn
        self.roundIndex = roundIndex
        self.clients = clients
    }

    /// Sample weights p_k = n_k / Σ n_j over the clients present.
    public var weights: [Double] {
        let total = clients.reduce(0) { $0 + $1.samples }
        return clients.map { $0.samples / total }
    }

    /// The ranks of the clients, in order.
    public var ranks: [Int] { clients.map(\.rank) }

    /// The largest client rank.
    public var maxRank: Int { ranks.max() ?? 0 }

    /// Whether every client has the same rank.
    public var ranksAreEqual: Bool { Set(ranks).count <= 1 }

    /// The scaling of the aggregated adapter used by factor-averaging
    /// strategies: the clients' common scaling when they agree, otherwise the
    /// sample-weighted mean Σ p_k s_k. See ``factorRescale(_:)``.
    public var commonScaling: Double {
        let scalings = clients.map(\.scaling)
        if let first = scalings.first, scalings.allSatisfy({ $0 == first }) { return first }
        return zip(weights, scalings).reduce(0) { $0 + $1.0 * $1.1 }
    }

    /// The factor √(s_k / s) by which client k's A and B are each multiplied
    /// before factors are averaged, so that every client's product is
    /// expressed at the common scaling s: (√c B_k)(√c A_k)·s = s_k B_k A_k.
    /// Exactly 1 when all scalings agree, so no rounding is added then.
    public func factorRescale(_ k: Int) -> Double {
        let s = commonScaling
        return clients[k].scaling == s ? 1 : (clients[k].scaling / s).squareRoot()
    }

    /// Checks everything a strategy may assume: at least one client, positive
    /// finite samples with a positive total, positive finite scalings, and
    /// factor shapes that agree with d_out, d_in and each other. Finiteness of
    /// the factors is checked by ``firstNonFiniteClient()`` (it costs a pass
    /// over the data, so the plugin kit runs it only when a result is not finite).
    public func validate() throws {
        if clients.isEmpty {
            throw AggregationError.invalidInput("module '\(module)': no clients in the round")
        }
        if dOut <= 0 || dIn <= 0 {
            throw AggregationError.invalidInput("module '\(module)': invalid shape \(dOut)x\(dIn)")
        }
        for client in clients {
            let who = "module '\(module)', client '\(client.id)'"
            if !(client.samples.isFinite && client.samples >= 0) {
                throw AggregationError.invalidInput("\(who): invalid sample count \(client.samples); expected a finite number >= 0")
            }
            if !(client.scaling.isFinite && client.scaling > 0) {
                throw AggregationError.invalidInput("\(who): invalid scaling \(client.scaling); expected a finite number > 0")
            }
            if client.rank < 1 {
                throw AggregationError.invalidInput("\(who): rank is 0; expected at least 1")
            }
            if client.a.cols != dIn {
                throw AggregationError.invalidInput("\(who): A is \(client.a.rows)x\(client.a.cols); expected \(client.rank)x\(dIn) (rank x d_in)")
            }
            if client.b.rows != dOut || client.b.cols != client.rank {
                throw AggregationError.invalidInput("\(who): B is \(client.b.rows)x\(client.b.cols); expected \(dOut)x\(client.rank) (d_out x rank, the rank of A)")
            }
        }
        let total = clients.reduce(0) { $0 + $1.samples }
        if !(total > 0) {
            throw AggregationError.invalidInput("module '\(module)': total sample count is \(total); at least one client needs samples > 0")
        }
    }

    /// Throws unless all clients share one rank; for strategies without heterogeneous-rank support.
    public func requireEqualRanks(strategy: String) throws {
        if !ranksAreEqual {
            let listed = clients.map { "'\($0.id)' r=\($0.rank)" }.joined(separator: ", ")
            throw AggregationError.unsupported("module '\(module)': \(strategy) needs clients of equal rank, got \(listed); use a strategy that accepts heterogeneous ranks (zero-pad, replication-pad, flexlora, flora)")
        }
    }

    /// The first client with a NaN or infinite entry, and which factor.
    public func firstNonFiniteClient() -> (client: String, factor: String)? {
        for client in clients {
            if !client.a.isFinite { return (client.id, "A") }
            if !client.b.isFinite { return (client.id, "B") }
        }
        return nil
    }
}

/// One client's LoRA factors for one module, owning its storage.
///
/// The value form of ``ClientFactors`` for tests, the demo and file readers;
/// ``ModuleRound/withRound(module:dOut:dIn:roundIndex:clients:_:)`` lends them to an aggregator.
public struct ClientUpdate: Sendable, Equatable {
    public var id: String
    public var samples: Double
    public var scaling: Double
    /// rank×d_in.
    public var a: Matrix
    /// d_out×rank.
    public var b: Matrix

    /// Creates an owned client update.
    public init(id: String, samples: Double, scaling: Double, a: Matrix, b: Matrix) {
        self.id = id
        self.samples = samples
        self.scaling = scaling
        self.a = a
        self.b = b
    }

    /// The LoRA rank.
    public var rank: Int { a.rows }
}

extension ModuleRound {
    /// Builds a borrowed round over owned updates and calls `body` with it.
    public static func withRound<R>(module: String, dOut: Int, dIn: Int, roundIndex: Int = 0,
                                    clients: [ClientUpdate], _ body: (ModuleRound) throws -> R) rethrows -> R {
        var views: [ClientFactors] = []
        views.reserveCapacity(clients.count)
        // Arrays keep their storage while `clients` is alive, and nothing
        // mutates them inside `body`, so the pointers stay valid.
        func lend(_ index: Int) throws -> R {
            if index == clients.count {
                return try body(ModuleRound(module: module, dOut: dOut, dIn: dIn, roundIndex: roundIndex, clients: views))
            }
            let client = clients[index]
            return try client.a.withView { a in
                try client.b.withView { b in
                    views.append(ClientFactors(id: client.id, samples: client.samples, scaling: client.scaling, a: a, b: b))
                    return try lend(index + 1)
                }
            }
        }
        return try lend(0)
    }
}
