import LoraAggABIBridge
import Foundation
import LoraAggCore

/// A loaded C plugin's instance, seen as an ``Aggregator`` again.
///
/// Client factors cross the boundary without a copy: the C round points into
/// the caller's memory. Neither does the result: its matrices borrow the
/// plugin's buffers, and the plugin's `free_result` runs when the last of
/// them is dropped (the instance is kept alive until then, so `destroy`
/// always comes after every `free_result`).
public final class PluginAggregator: Aggregator, @unchecked Sendable {
    /// The plugin this instance belongs to.
    public let plugin: LoadedPlugin
    /// The checked hyperparameters it was created with.
    public let parameters: StrategyParameters
    fileprivate let state: UnsafeMutableRawPointer

    init(plugin: LoadedPlugin, parameters: StrategyParameters) throws {
        self.plugin = plugin
        self.parameters = parameters
        var created: UnsafeMutableRawPointer?
        var message = [CChar](repeating: 0, count: 2048)
        let status = plugin.descriptor.pointee.create(parameters.json, HostServices.table, &created, &message, message.count)
        guard status == LORA_AGG_OK, let created else {
            throw Self.error(status == LORA_AGG_OK ? LORA_AGG_INTERNAL_ERROR : status,
                             message, fallback: "create returned no state")
        }
        state = created
    }

    deinit { plugin.descriptor.pointee.destroy(state) }

    public func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        // The C round carries only pointers and ranks: shapes must be right
        // before they cross, or the plugin would read out of bounds.
        try round.validate()
        return try send(round)
    }

    /// Sends the round to the plugin without the host's validation, so the
    /// conformance suite can check that the plugin itself refuses bad input
    /// (no clients, zero samples, rank 0, NaN). The caller must still make
    /// every factor's buffer as large as the ranks and shapes it declares.
    public func aggregateWithoutHostValidation(_ round: ModuleRound) throws -> AggregationResult {
        try send(round)
    }

    private func send(_ round: ModuleRound) throws -> AggregationResult {
        let descriptor = plugin.descriptor.pointee
        let ids = round.clients.map { strdup($0.id)! }
        let module = strdup(round.module)!
        defer { ids.forEach { free($0) }; free(module) }
        let clients = round.clients.enumerated().map { k, client in
            lora_agg_client(struct_size: UInt32(MemoryLayout<lora_agg_client>.size), rank: UInt32(client.rank),
                            samples: client.samples, scaling: client.scaling,
                            a: client.a.base, b: client.b.base, client_id: ids[k])
        }
        var message = [CChar](repeating: 0, count: 2048)
        var result = lora_agg_result()
        result.struct_size = UInt32(MemoryLayout<lora_agg_result>.size)
        let status = clients.withUnsafeBufferPointer { table -> lora_agg_status in
            var raw = lora_agg_round(struct_size: UInt32(MemoryLayout<lora_agg_round>.size),
                                     client_count: UInt32(round.clients.count),
                                     d_out: UInt64(round.dOut), d_in: UInt64(round.dIn),
                                     module_name: module, round_index: UInt64(round.roundIndex),
                                     clients: table.baseAddress ?? UnsafePointer(bitPattern: 8)!)
            return descriptor.aggregate(state, &raw, &result, &message, message.count)
        }
        guard status == LORA_AGG_OK else { throw Self.error(status, message, fallback: "aggregate failed") }
        // From here on the lease frees the result, on error as soon as it is dropped.
        let lease = ResultLease(result, aggregator: self)
        return try convert(lease, round: round)
    }

    /// Wraps a plugin-owned result in Swift values (borrowing its buffers), checking its shapes.
    private func convert(_ lease: ResultLease, round: ModuleRound) throws -> AggregationResult {
        let raw = lease.result
        let dOut = round.dOut, dIn = round.dIn
        func matrix(_ pointer: UnsafeMutablePointer<Float>?, _ rows: Int, _ cols: Int, _ field: String) throws -> Matrix {
            if rows * cols == 0 { return Matrix(zeros: rows, cols) }
            guard let pointer else {
                throw AggregationError.internalError("module '\(round.module)': plugin '\(plugin.info.name)' returned NULL '\(field)'")
            }
            return Matrix(rows: rows, cols: cols, storage: MatrixStorage(borrowing: pointer, count: rows * cols, owner: lease))
        }
        let rank = Int(raw.rank)
        var result = AggregationResult(a: try matrix(raw.a, rank, dIn, "a"), b: try matrix(raw.b, dOut, rank, "b"),
                                       scaling: raw.scaling)
        if raw.residual_rank > 0 {
            let q = Int(raw.residual_rank)
            result.residual = FactoredResidual(u: try matrix(raw.residual_u, dOut, q, "residual_u"),
                                               v: try matrix(raw.residual_v, q, dIn, "residual_v"))
        }
        if raw.client_payload_count > 0, let payloads = raw.client_payloads {
            result.clientPayloads = try (0..<Int(raw.client_payload_count)).map { k in
                let p = payloads[k]
                let r = Int(p.rank)
                return ClientPayload(a: try matrix(p.a, r, dIn, "client_payloads[\(k)].a"),
                                     b: try matrix(p.b, dOut, r, "client_payloads[\(k)].b"), scaling: p.scaling)
            }
        }
        if raw.diagnostic_count > 0, let diagnostics = raw.diagnostics {
            result.diagnostics = (0..<Int(raw.diagnostic_count)).map {
                Diagnostic(String(cString: diagnostics[$0].name), diagnostics[$0].value)
            }
        }
        let problems = result.shapeProblems(dOut: dOut, dIn: dIn, clientRanks: round.ranks)
        if !problems.isEmpty {
            throw AggregationError.internalError("module '\(round.module)': plugin '\(plugin.info.name)' returned an inconsistent result: \(problems.joined(separator: "; "))")
        }
        return result
    }

    public func saveState() throws -> [UInt8]? {
        guard let save = plugin.descriptor.pointee.save_state, let release = plugin.descriptor.pointee.free_bytes else { return nil }
        var bytes = lora_agg_bytes()
        var message = [CChar](repeating: 0, count: 2048)
        let status = save(state, &bytes, &message, message.count)
        guard status == LORA_AGG_OK else { throw Self.error(status, message, fallback: "save_state failed") }
        defer { release(state, &bytes) }
        guard let data = bytes.data else { return [] }
        return Array(UnsafeBufferPointer(start: data, count: Int(bytes.size)))
    }

    public func loadState(_ bytes: [UInt8]) throws {
        guard let load = plugin.descriptor.pointee.load_state else {
            throw AggregationError.invalidState("strategy '\(plugin.info.name)' keeps no state across rounds")
        }
        var message = [CChar](repeating: 0, count: 2048)
        let status = bytes.withUnsafeBufferPointer { buffer in
            load(state, buffer.baseAddress ?? UnsafePointer(bitPattern: 8)!, UInt64(buffer.count), &message, message.count)
        }
        guard status == LORA_AGG_OK else { throw Self.error(status, message, fallback: "load_state failed") }
    }

    /// Maps an ABI status and message back to an ``AggregationError``.
    static func error(_ status: lora_agg_status, _ buffer: [CChar], fallback: String) -> AggregationError {
        let text = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return AggregationError(status: status, message: text.isEmpty ? fallback : text)
    }
}

/// A plugin's result kept alive while Swift matrices borrow its buffers;
/// its deinit hands the result back to the plugin's `free_result`.
private final class ResultLease: @unchecked Sendable {
    var result: lora_agg_result
    /// Keeps the plugin instance (its `state`) alive until `free_result`.
    let aggregator: PluginAggregator

    init(_ result: lora_agg_result, aggregator: PluginAggregator) {
        self.result = result
        self.aggregator = aggregator
    }

    deinit { aggregator.plugin.descriptor.pointee.free_result(aggregator.state, &result) }
}
