@_exported import LoraAggCore
import LoraAggABIBridge

/// Turns a Swift ``Strategy`` into the plugin descriptor of the C ABI.
///
/// A plugin file ends with its one export line:
///
/// ```swift
/// @_cdecl("lora_agg_plugin_entry") public func entry() -> UnsafeRawPointer { export(FedIT.self) }
/// ```
///
/// The entry must be `public`: an internal `@_cdecl` function is exported in
/// debug builds only. Each plugin `.so` has its own copy of this kit (it is
/// linked statically and loaded with RTLD_LOCAL), so the one global below is
/// per plugin.
public func export<S: Strategy>(_ strategy: S.Type) -> UnsafeRawPointer {
    exportLock.lock()
    defer { exportLock.unlock() }
    if let descriptor = exported { return UnsafeRawPointer(descriptor) }
    let info = S.info
    let table = ExportTable(info: info) { parameters in try S(parameters: parameters) }
    exportedTable = table
    let descriptor = UnsafeMutablePointer<lora_agg_plugin>.allocate(capacity: 1)
    descriptor.initialize(to: lora_agg_plugin(
        abi_major: UInt32(LORA_AGG_ABI_MAJOR),
        abi_minor: UInt32(LORA_AGG_ABI_MINOR),
        struct_size: UInt32(MemoryLayout<lora_agg_plugin>.size),
        reserved: 0,
        name: immortal(info.name),
        version: immortal(info.version),
        summary: immortal(info.summary),
        citation: immortal(info.citation),
        description: immortal(info.description),
        parameters_schema: immortal(ParameterSpec.schemaJSON(info.parameters)),
        capabilities: info.capabilities.rawValue,
        create: pluginCreate,
        aggregate: pluginAggregate,
        free_result: pluginFreeResult,
        destroy: pluginDestroy,
        save_state: info.capabilities.contains(.stateful) ? pluginSaveState : nil,
        load_state: info.capabilities.contains(.stateful) ? pluginLoadState : nil,
        free_bytes: info.capabilities.contains(.stateful) ? pluginFreeBytes : nil,
        get_extension: nil
    ))
    exported = descriptor
    return UnsafeRawPointer(descriptor)
}

/// What the C callbacks need of the exported Swift type.
final class ExportTable: @unchecked Sendable {
    let info: StrategyInfo
    let make: (StrategyParameters) throws -> any Aggregator
    init(info: StrategyInfo, make: @escaping (StrategyParameters) throws -> any Aggregator) {
        self.info = info
        self.make = make
    }
}

/// One created instance behind the opaque `void *state`.
final class Instance: @unchecked Sendable {
    let aggregator: any Aggregator
    let host: UnsafePointer<lora_agg_host_api>?
    init(aggregator: any Aggregator, host: UnsafePointer<lora_agg_host_api>?) {
        self.aggregator = aggregator
        self.host = host
    }
}

/// Storage of one result until `free_result`.
final class ResultStorage {
    var matrices: [UnsafeMutablePointer<Float>] = []
    /// Storage blocks handed to the host as they are; released with the result.
    var shared: [MatrixStorage] = []
    var payloads: UnsafeMutablePointer<lora_agg_client_payload>?
    var diagnostics: UnsafeMutablePointer<lora_agg_diagnostic>?
    var names: [UnsafeMutablePointer<CChar>] = []

    /// A pointer to `matrix`'s values that stays valid until `free_result`:
    /// its own storage block when it has one (no copy; a result can be as
    /// large as the round), else a copy of its array.
    func hand(_ matrix: Matrix) -> UnsafeMutablePointer<Float> {
        if let storage = matrix.sharedStorage {
            shared.append(storage)
            return storage.base
        }
        let count = matrix.rows * matrix.cols
        let pointer = UnsafeMutablePointer<Float>.allocate(capacity: max(1, count))
        matrix.withUnsafeBufferPointer { source in
            // The host reads rows·cols values; never write past them, nor leave any unset.
            let copied = min(count, source.count)
            if let base = source.baseAddress { pointer.initialize(from: base, count: copied) }
            (pointer + copied).initialize(repeating: 0, count: count - copied)
        }
        matrices.append(pointer)
        return pointer
    }

    deinit {
        matrices.forEach { $0.deallocate() }
        payloads?.deallocate()
        diagnostics?.deallocate()
        names.forEach { free($0) }
    }
}

nonisolated(unsafe) private var exported: UnsafeMutablePointer<lora_agg_plugin>?
nonisolated(unsafe) private var exportedTable: ExportTable?
private let exportLock = NSLock()

/// A C string that lives until process exit (descriptor strings).
private func immortal(_ text: String) -> UnsafePointer<CChar> { UnsafePointer(strdup(text)!) }

private let pluginCreate: @convention(c) (UnsafePointer<CChar>, UnsafePointer<lora_agg_host_api>,
                                          UnsafeMutablePointer<UnsafeMutableRawPointer?>,
                                          UnsafeMutablePointer<CChar>, Int) -> lora_agg_status = { json, host, out, message, capacity in
    out.pointee = nil
    guard let table = exportedTable else {
        writeErrorMessage("plugin descriptor was not initialised", to: message, capacity: capacity)
        return LORA_AGG_INTERNAL_ERROR
    }
    do {
        let parameters = try StrategyParameters(specs: table.info.parameters, json: String(cString: json))
        let instance = Instance(aggregator: try table.make(parameters), host: host)
        out.pointee = Unmanaged.passRetained(instance).toOpaque()
        return LORA_AGG_OK
    } catch {
        return reportError(error, to: message, capacity: capacity)
    }
}

private let pluginAggregate: @convention(c) (UnsafeMutableRawPointer, UnsafePointer<lora_agg_round>,
                                             UnsafeMutablePointer<lora_agg_result>,
                                             UnsafeMutablePointer<CChar>, Int) -> lora_agg_status = { state, roundPointer, resultPointer, message, capacity in
    let instance = Unmanaged<Instance>.fromOpaque(state).takeUnretainedValue()
    let raw = roundPointer.pointee
    let dOut = Int(raw.d_out), dIn = Int(raw.d_in)
    let module = String(cString: raw.module_name)
    var clients: [ClientFactors] = []
    clients.reserveCapacity(Int(raw.client_count))
    for k in 0..<Int(raw.client_count) {
        let c = raw.clients[k]
        let rank = Int(c.rank)
        clients.append(ClientFactors(
            id: c.client_id.map { String(cString: $0) } ?? "client-\(k)",
            samples: c.samples, scaling: c.scaling,
            a: MatrixView(rows: rank, cols: dIn, base: c.a),
            b: MatrixView(rows: dOut, cols: rank, base: c.b)))
    }
    let round = ModuleRound(module: module, dOut: dOut, dIn: dIn, roundIndex: Int(raw.round_index), clients: clients)
    do {
        try round.validate()
        let result = try instance.aggregator.aggregate(round)
        let problems = result.shapeProblems(dOut: dOut, dIn: dIn, clientRanks: round.ranks)
        if !problems.isEmpty {
            throw AggregationError.internalError("module '\(module)': the strategy returned an inconsistent result: \(problems.joined(separator: "; "))")
        }
        if !result.isFinite {
            // Checking inputs only when the output is not finite keeps the
            // happy path at one pass over the data.
            if let culprit = round.firstNonFiniteClient() {
                throw AggregationError.invalidInput("module '\(module)', client '\(culprit.client)': \(culprit.factor) contains NaN or infinite values")
            }
            throw AggregationError.internalError("module '\(module)': the strategy produced NaN or infinite values from finite input")
        }
        fill(resultPointer, with: result)
        return LORA_AGG_OK
    } catch {
        return reportError(error, to: message, capacity: capacity)
    }
}

/// Hands a Swift result over as plugin-owned C memory (copying only array-backed matrices).
private func fill(_ out: UnsafeMutablePointer<lora_agg_result>, with result: AggregationResult) {
    let storage = ResultStorage()
    out.pointee.rank = UInt32(result.rank)
    out.pointee.scaling = result.scaling
    out.pointee.a = storage.hand(result.a)
    out.pointee.b = storage.hand(result.b)
    if let residual = result.residual, residual.rank > 0 {
        out.pointee.residual_rank = UInt32(residual.rank)
        out.pointee.residual_u = storage.hand(residual.u)
        out.pointee.residual_v = storage.hand(residual.v)
    }
    if let payloads = result.clientPayloads, !payloads.isEmpty {
        let table = UnsafeMutablePointer<lora_agg_client_payload>.allocate(capacity: payloads.count)
        for (k, payload) in payloads.enumerated() {
            (table + k).initialize(to: lora_agg_client_payload(
                struct_size: UInt32(MemoryLayout<lora_agg_client_payload>.size),
                rank: UInt32(payload.rank), scaling: payload.scaling,
                a: storage.hand(payload.a), b: storage.hand(payload.b)))
        }
        storage.payloads = table
        out.pointee.client_payload_count = UInt32(payloads.count)
        out.pointee.client_payloads = table
    }
    if !result.diagnostics.isEmpty {
        let table = UnsafeMutablePointer<lora_agg_diagnostic>.allocate(capacity: result.diagnostics.count)
        for (k, diagnostic) in result.diagnostics.enumerated() {
            let name = strdup(diagnostic.name)!
            storage.names.append(name)
            (table + k).initialize(to: lora_agg_diagnostic(name: name, value: diagnostic.value))
        }
        storage.diagnostics = table
        out.pointee.diagnostic_count = UInt32(result.diagnostics.count)
        out.pointee.diagnostics = UnsafePointer(table)
    }
    out.pointee.plugin_private = Unmanaged.passRetained(storage).toOpaque()
}

private let pluginFreeResult: @convention(c) (UnsafeMutableRawPointer, UnsafeMutablePointer<lora_agg_result>) -> Void = { _, result in
    if let storage = result.pointee.plugin_private {
        Unmanaged<ResultStorage>.fromOpaque(storage).release()
    }
    result.pointee.plugin_private = nil
}

private let pluginDestroy: @convention(c) (UnsafeMutableRawPointer) -> Void = { state in
    Unmanaged<Instance>.fromOpaque(state).release()
}

private let pluginSaveState: @convention(c) (UnsafeMutableRawPointer, UnsafeMutablePointer<lora_agg_bytes>,
                                             UnsafeMutablePointer<CChar>, Int) -> lora_agg_status = { state, out, message, capacity in
    let instance = Unmanaged<Instance>.fromOpaque(state).takeUnretainedValue()
    do {
        let bytes = try instance.aggregator.saveState() ?? []
        let buffer = UnsafeMutablePointer<UInt8>.allocate(capacity: max(1, bytes.count))
        bytes.withUnsafeBufferPointer { if let base = $0.baseAddress { buffer.initialize(from: base, count: bytes.count) } }
        out.pointee = lora_agg_bytes(data: UnsafePointer(buffer), size: UInt64(bytes.count), plugin_private: UnsafeMutableRawPointer(buffer))
        return LORA_AGG_OK
    } catch {
        return reportError(error, to: message, capacity: capacity)
    }
}

private let pluginLoadState: @convention(c) (UnsafeMutableRawPointer, UnsafePointer<UInt8>, UInt64,
                                             UnsafeMutablePointer<CChar>, Int) -> lora_agg_status = { state, data, size, message, capacity in
    let instance = Unmanaged<Instance>.fromOpaque(state).takeUnretainedValue()
    do {
        try instance.aggregator.loadState(Array(UnsafeBufferPointer(start: data, count: Int(size))))
        return LORA_AGG_OK
    } catch {
        return reportError(error, to: message, capacity: capacity)
    }
}

private let pluginFreeBytes: @convention(c) (UnsafeMutableRawPointer, UnsafeMutablePointer<lora_agg_bytes>) -> Void = { _, bytes in
    bytes.pointee.plugin_private?.deallocate()
    bytes.pointee = lora_agg_bytes(data: nil, size: 0, plugin_private: nil)
}

import Foundation
