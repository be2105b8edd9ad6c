import Dispatch
import Foundation
import LoraAggCore

/// The version written into metadata and reports.
public let loraAggToolVersion = "0.1.0"

/// What to do with tensors that are not LoRA factors (modules_to_save heads, biases).
public enum ExtraTensorPolicy: String, Sendable, CaseIterable {
    /// Sample-weighted mean over the clients holding the tensor.
    case average
    /// The first client's copy.
    case first
    /// Leave them out of the output.
    case drop
    /// Refuse adapters that have any.
    case error
}

/// One client adapter on the command line: `DIR` or `DIR=SAMPLES`.
public struct ClientSpec: Sendable, Equatable {
    public var folder: String
    public var samples: Double

    public init(folder: String, samples: Double = 1) {
        self.folder = folder
        self.samples = samples
    }

    /// Parses `DIR[=SAMPLES]`; samples default to 1. A folder whose name
    /// contains '=' is taken whole when the part after the last '=' is not a number.
    public init(parsing text: String) throws {
        if let split = text.lastIndex(of: "="), let samples = Double(text[text.index(after: split)...]) {
            guard samples.isFinite, samples >= 0 else {
                throw AdapterError(.invalidConfig, "invalid sample count in '\(text)'; expected a finite number >= 0")
            }
            self.init(folder: String(text[..<split]), samples: samples)
        } else {
            self.init(folder: text, samples: 1)
        }
    }
}

/// Options of one `aggregate` run.
public struct AggregationOptions: Sendable {
    /// Strategy name, version and checked parameters (JSON), for metadata and the report.
    public var strategyName: String
    public var strategyVersion: String
    public var parametersJSON: String
    /// Output dtype; nil means the inputs' dtype.
    public var dtype: DType?
    public var extraTensors: ExtraTensorPolicy
    /// Allow a module present in only some clients (aggregated over those that have it).
    public var allowPartialModules: Bool
    /// Replace an existing output.
    public var force: Bool
    /// Report progress on standard error.
    public var progress: Bool
    /// The federated round number passed to the strategy (stateful strategies key on it).
    public var roundIndex: Int

    public init(strategyName: String, strategyVersion: String = "", parametersJSON: String = "{}",
                dtype: DType? = nil, extraTensors: ExtraTensorPolicy = .average,
                allowPartialModules: Bool = false, force: Bool = false, progress: Bool = false,
                roundIndex: Int = 0) {
        self.roundIndex = roundIndex
        self.strategyName = strategyName
        self.strategyVersion = strategyVersion
        self.parametersJSON = parametersJSON
        self.dtype = dtype
        self.extraTensors = extraTensors
        self.allowPartialModules = allowPartialModules
        self.force = force
        self.progress = progress
    }
}

/// What an `aggregate` run produced, as also written to `report.json`.
public struct AggregationSummary: Sendable {
    public var output: String
    public var modules: Int
    public var outputRanks: [String: Int]
    public var residualFile: String?
    public var clientFolders: [String]
    public var seconds: Double
    public var report: JSONValue
}

/// Reads client adapters, aggregates every module with a strategy, and
/// writes a PEFT adapter folder (plus residual, per-client adapters and a
/// report) atomically.
public enum AggregationJob {
    /// File names inside the output folder.
    public static let residualName = "residual.safetensors"
    public static let reportName = "report.json"
    public static let clientsFolder = "clients"

    /// Runs the job. Nothing exists at `output` unless the whole run succeeds.
    public static func run(clients specs: [ClientSpec], aggregator: any Aggregator, options: AggregationOptions,
                           output: String) throws -> AggregationSummary {
        let start = Date()
        guard !specs.isEmpty else { throw AdapterError(.invalidConfig, "no clients; give at least one --client DIR[=SAMPLES]") }
        try checkOutput(output, inputs: specs.map(\.folder), force: options.force)
        let adapters = try specs.map { try PeftAdapter(folder: $0.folder) }
        let ids = uniqueIDs(specs.map(\.folder))
        let moduleNames = try checkAgreement(adapters, allowPartial: options.allowPartialModules)
        let extras = try checkExtras(adapters, policy: options.extraTensors)

        let inputTypes = Set(adapters.map(\.loraDType))
        let dtype = options.dtype ?? ((inputTypes.count == 1 ? inputTypes.first! : nil) ?? .f32)

        // Aggregate modules in parallel; each task converts (or borrows) its
        // own tensors so only a few modules' floats are alive at once.
        let count = moduleNames.count
        let slots = ResultSlots(count: count)
        let results = slots.buffer
        let progress = Progress(total: count, enabled: options.progress)
        DispatchQueue.concurrentPerform(iterations: count) { index in
            let module = moduleNames[index]
            slots.buffer[index] = Result {
                var storages: [FloatStorage] = []
                var factors: [ClientFactors] = []
                var shape = (dOut: 0, dIn: 0)
                for (k, adapter) in adapters.enumerated() {
                    guard let info = adapter.modules[module] else { continue }
                    let a = try adapter.file.floats(info.a), b = try adapter.file.floats(info.b)
                    storages += [a, b]
                    shape = (info.dOut, info.dIn)
                    factors.append(ClientFactors(id: ids[k], samples: specs[k].samples, scaling: info.scaling,
                                                 a: a.view(rows: info.rank, cols: info.dIn),
                                                 b: b.view(rows: info.dOut, cols: info.rank)))
                }
                let round = ModuleRound(module: module, dOut: shape.dOut, dIn: shape.dIn,
                                        roundIndex: options.roundIndex, clients: factors)
                let result = try withExtendedLifetime(storages) { try aggregator.aggregate(round) }
                progress.step()
                return result
            }
        }
        progress.finish()
        var outputs: [AggregationResult] = []
        for index in 0..<count {
            switch results[index]! {
            case .success(let result): outputs.append(result)
            case .failure(let error):
                if let error = error as? AggregationError, !error.message.contains("'\(moduleNames[index])'") {
                    throw AdapterError(.invalidOutput, "module '\(moduleNames[index])': \(error.message)")
                }
                throw error
            }
        }

        // Build the output in a temporary folder beside the target.
        let outURL = URL(fileURLWithPath: output).standardizedFileURL
        let parent = outURL.deletingLastPathComponent().path
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        let temporary = parent + "/." + outURL.lastPathComponent + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: temporary, withIntermediateDirectories: false)
        var finished = false
        defer { if !finished { try? FileManager.default.removeItem(atPath: temporary) } }

        let first = adapters[0]
        let useRslora = first.config.useRslora
        let metadata = outputMetadata(first.file.metadata, options: options, specs: specs, ids: ids)
        let extraTensors = try mergedExtras(extras, adapters: adapters, specs: specs, policy: options.extraTensors, dtype: options.dtype)

        // The global adapter.
        var tensors: [TensorToWrite] = extraTensors
        for (module, result) in zip(moduleNames, outputs) {
            tensors += factorTensors(module: module, a: result.a, b: result.b, dtype: dtype)
        }
        let config = try AdapterWriter.config(
            from: first.config.json,
            modules: zip(moduleNames, outputs).map { ($0, $1.rank, $1.scaling) }, useRslora: useRslora)
        try AdapterWriter.write(folder: temporary, config: config, tensors: tensors, metadata: metadata)

        // The residual, kept factored and keyed by module path.
        var residualFile: String?
        let residuals = zip(moduleNames, outputs).compactMap { module, result in result.residual.map { (module, $0) } }
        if !residuals.isEmpty {
            var residualTensors: [TensorToWrite] = []
            for (module, residual) in residuals {
                residualTensors.append(TensorToWrite(name: module + ".U", dtype: .f32, shape: [residual.u.rows, residual.u.cols], floats: residual.u.values))
                residualTensors.append(TensorToWrite(name: module + ".V", dtype: .f32, shape: [residual.v.rows, residual.v.cols], floats: residual.v.values))
            }
            let residualMetadata: [(String, String)] = [
                ("format", "lora-agg-residual"), ("version", "1"),
                ("fan_in_fan_out", first.config.fanInFanOut ? "true" : "false"),
                ("strategy", options.strategyName), ("base_model_name_or_path", first.config.baseModel ?? ""),
            ]
            try SafeTensorsWriter.write(residualTensors, metadata: residualMetadata, to: temporary + "/" + residualName)
            residualFile = outURL.path + "/" + residualName
        }

        // Per-client adapters when the strategy personalises.
        var clientFolders: [String] = []
        if outputs.contains(where: { $0.clientPayloads != nil }) {
            try FileManager.default.createDirectory(atPath: temporary + "/" + clientsFolder, withIntermediateDirectories: false)
            for (k, id) in ids.enumerated() {
                var clientTensors = extraTensors
                var clientModules: [(name: String, rank: Int, scaling: Double)] = []
                for (module, result) in zip(moduleNames, outputs) {
                    guard let position = positionOfClient(k, module: module, adapters: adapters) else { continue }
                    let a: Matrix, b: Matrix, scaling: Double
                    if let payload = result.clientPayloads?[position] {
                        (a, b, scaling) = (payload.a, payload.b, payload.scaling)
                    } else {
                        // Without a payload a client takes the first r_k rank slots of the global factors.
                        let r = min(adapters[k].modules[module]!.rank, result.rank)
                        a = Matrix(rows: r, cols: result.a.cols, values: Array(result.a.values[0..<(r * result.a.cols)]))
                        b = Matrix(rows: result.b.rows, cols: r) { i, j in result.b[i, j] }
                        scaling = result.scaling
                    }
                    clientTensors += factorTensors(module: module, a: a, b: b, dtype: dtype)
                    clientModules.append((module, a.rows, scaling))
                }
                let folder = temporary + "/" + clientsFolder + "/" + id
                try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: false)
                let clientConfig = try AdapterWriter.config(from: adapters[k].config.json, modules: clientModules, useRslora: adapters[k].config.useRslora)
                try AdapterWriter.write(folder: folder, config: clientConfig, tensors: clientTensors, metadata: metadata)
                clientFolders.append(outURL.path + "/" + clientsFolder + "/" + id)
            }
        }

        let seconds = Date().timeIntervalSince(start)
        let report = makeReport(options: options, specs: specs, ids: ids, adapters: adapters, moduleNames: moduleNames,
                                outputs: outputs, dtype: dtype, extras: extraTensors.map(\.name), seconds: seconds,
                                residual: residualFile != nil, perClient: !clientFolders.isEmpty)
        try AtomicFile.write(text: report.pretty, to: temporary + "/" + reportName)

        try install(temporary, at: outURL.path, force: options.force)
        finished = true
        var ranks: [String: Int] = [:]
        for (module, result) in zip(moduleNames, outputs) { ranks[module] = result.rank }
        return AggregationSummary(output: outURL.path, modules: count, outputRanks: ranks, residualFile: residualFile,
                                  clientFolders: clientFolders, seconds: seconds, report: report)
    }

    // MARK: Checks

    /// Refuses an existing output without force, and any output that is, or
    /// contains, an input folder (a forced replace would delete it).
    static func checkOutput(_ output: String, inputs: [String], force: Bool) throws {
        let out = resolved(output)
        for input in inputs {
            let folder = resolved(input)
            if folder == out || folder.hasPrefix(out + "/") {
                throw AdapterError(.outputIsInput, "output '\(output)' is or contains the input adapter '\(input)'; choose another --out")
            }
        }
        if FileManager.default.fileExists(atPath: output) && !force {
            throw AdapterError(.outputExists, "output '\(output)' already exists; pass --force to replace it")
        }
    }

    /// A path with symlinks of its existing part resolved.
    static func resolved(_ path: String) -> String {
        let url = URL(fileURLWithPath: path).standardizedFileURL
        if let real = realpath(url.path, nil) {
            defer { free(real) }
            return String(cString: real)
        }
        let parent = url.deletingLastPathComponent()
        if parent.path == url.path { return url.path }
        return resolved(parent.path) + "/" + url.lastPathComponent
    }

    /// Checks that the clients agree on the base model, fan_in_fan_out, the
    /// module set and module shapes; returns the sorted module names.
    static func checkAgreement(_ adapters: [PeftAdapter], allowPartial: Bool) throws -> [String] {
        let first = adapters[0]
        for adapter in adapters.dropFirst() {
            if adapter.config.baseModel != first.config.baseModel {
                throw AdapterError(.baseModelMismatch, "client '\(adapter.folder)' was trained on base model '\(adapter.config.baseModel ?? "null")' but client '\(first.folder)' on '\(first.config.baseModel ?? "null")'; all clients must share base_model_name_or_path")
            }
            if adapter.config.fanInFanOut != first.config.fanInFanOut {
                throw AdapterError(.fanInFanOutMismatch, "client '\(adapter.folder)' has fan_in_fan_out \(adapter.config.fanInFanOut) but client '\(first.folder)' has \(first.config.fanInFanOut)")
            }
        }
        var all = Set<String>()
        for adapter in adapters { all.formUnion(adapter.modules.keys) }
        let names = all.sorted()
        for module in names {
            var reference: (folder: String, dOut: Int, dIn: Int)?
            for adapter in adapters {
                guard let info = adapter.modules[module] else {
                    if allowPartial { continue }
                    let holder = adapters.first { $0.modules[module] != nil }!
                    throw AdapterError(.missingModule, "client '\(adapter.folder)' has no LoRA module '\(module)', which client '\(holder.folder)' has; all clients must adapt the same modules (--allow-partial-modules aggregates each module over the clients that have it)")
                }
                if let reference, reference.dOut != info.dOut || reference.dIn != info.dIn {
                    throw AdapterError(.moduleShapeMismatch, "client '\(adapter.folder)', module '\(module)': shape \(info.dOut)x\(info.dIn) (out x in) differs from \(reference.dOut)x\(reference.dIn) in client '\(reference.folder)'")
                }
                if reference == nil { reference = (adapter.folder, info.dOut, info.dIn) }
            }
        }
        return names
    }

    /// The union of extra tensor names with their shapes checked across clients.
    static func checkExtras(_ adapters: [PeftAdapter], policy: ExtraTensorPolicy) throws -> [String] {
        var names: [String] = []
        var seen: [String: (folder: String, info: TensorInfo)] = [:]
        for adapter in adapters {
            for tensor in adapter.extraTensors {
                if policy == .error {
                    throw AdapterError(.extraTensorsRefused, "client '\(adapter.folder)' has non-LoRA tensor '\(tensor.name)' and --extra-tensors is 'error'; use average, first or drop")
                }
                if let (folder, other) = seen[tensor.name] {
                    if other.shape != tensor.shape {
                        throw AdapterError(.extraTensorMismatch, "client '\(adapter.folder)', tensor '\(tensor.name)': shape \(tensor.shape) differs from \(other.shape) in client '\(folder)'")
                    }
                } else {
                    seen[tensor.name] = (adapter.folder, tensor)
                    names.append(tensor.name)
                }
            }
        }
        if policy == .average {
            for name in names {
                for adapter in adapters {
                    if let tensor = adapter.file.info(name), !tensor.dtype.isFloatConvertible {
                        throw AdapterError(.extraTensorsRefused, "client '\(adapter.folder)', tensor '\(name)': dtype \(tensor.dtype.rawValue) cannot be averaged; use --extra-tensors first or drop")
                    }
                }
            }
        }
        return names.sorted()
    }

    // MARK: Output pieces

    static func factorTensors(module: String, a: Matrix, b: Matrix, dtype: DType) -> [TensorToWrite] {
        [TensorToWrite(name: PeftAdapter.prefix + module + ".lora_A.weight", dtype: dtype, shape: [a.rows, a.cols], floats: a.values),
         TensorToWrite(name: PeftAdapter.prefix + module + ".lora_B.weight", dtype: dtype, shape: [b.rows, b.cols], floats: b.values)]
    }

    static func mergedExtras(_ names: [String], adapters: [PeftAdapter], specs: [ClientSpec], policy: ExtraTensorPolicy,
                             dtype: DType?) throws -> [TensorToWrite] {
        guard policy == .average || policy == .first else { return [] }
        var out: [TensorToWrite] = []
        for name in names {
            let holders = adapters.indices.filter { adapters[$0].file.info(name) != nil }
            let firstInfo = adapters[holders[0]].file.info(name)!
            let target = dtype ?? firstInfo.dtype
            if policy == .first || holders.count == 1 {
                let file = adapters[holders[0]].file
                if target == firstInfo.dtype {
                    out.append(TensorToWrite(copying: firstInfo, from: file))
                } else {
                    out.append(TensorToWrite(name: name, dtype: target, shape: firstInfo.shape, floats: try file.floats(firstInfo).array))
                }
                continue
            }
            let total = holders.reduce(0) { $0 + specs[$1].samples }
            guard total > 0 else { throw AdapterError(.invalidConfig, "tensor '\(name)': the clients holding it have 0 samples in total") }
            var sum = [Double](repeating: 0, count: firstInfo.count)
            for k in holders {
                let storage = try adapters[k].file.floats(adapters[k].file.info(name)!)
                let weight = specs[k].samples / total
                for i in 0..<sum.count { sum[i] += weight * Double(storage.pointer[i]) }
            }
            out.append(TensorToWrite(name: name, dtype: target, shape: firstInfo.shape, floats: sum.map { Float($0) }))
        }
        return out
    }

    static func outputMetadata(_ inherited: [(String, String)], options: AggregationOptions, specs: [ClientSpec],
                               ids: [String]) -> [(String, String)] {
        var metadata = inherited.filter { !$0.0.hasPrefix("lora_agg.") }
        if !metadata.contains(where: { $0.0 == "format" }) { metadata.append(("format", "pt")) }
        let clients = JSONValue.array(zip(ids, specs).map { id, spec in
            .object([("id", .string(id)), ("samples", .number(spec.samples))])
        })
        metadata += [
            ("lora_agg.version", loraAggToolVersion),
            ("lora_agg.strategy", options.strategyName),
            ("lora_agg.strategy_version", options.strategyVersion),
            ("lora_agg.parameters", options.parametersJSON),
            ("lora_agg.clients", clients.compact),
        ]
        return metadata
    }

    static func makeReport(options: AggregationOptions, specs: [ClientSpec], ids: [String], adapters: [PeftAdapter],
                           moduleNames: [String], outputs: [AggregationResult], dtype: DType, extras: [String],
                           seconds: Double, residual: Bool, perClient: Bool) -> JSONValue {
        let total = specs.reduce(0) { $0 + $1.samples }
        let parameters = (try? JSONValue.parse(options.parametersJSON)) ?? .string(options.parametersJSON)
        let clients = JSONValue.array(specs.indices.map { k in
            .object([("id", .string(ids[k])), ("folder", .string(specs[k].folder)), ("samples", .number(specs[k].samples)),
                     ("weight", .number(total > 0 ? specs[k].samples / total : 0)),
                     ("dtype", .string(adapters[k].loraDType?.rawValue ?? "mixed")),
                     ("use_rslora", .bool(adapters[k].config.useRslora))])
        })
        let modules = JSONValue.array(zip(moduleNames, outputs).map { module, result in
            var entry: [(String, JSONValue)] = [
                ("name", .string(module)), ("rank", .integer(result.rank)), ("scaling", .number(result.scaling)),
                ("client_ranks", .array(adapters.compactMap { $0.modules[module].map { .integer($0.rank) } })),
                ("diagnostics", .object(result.diagnostics.map { ($0.name, .number($0.value)) })),
            ]
            if let r = result.residual { entry.append(("residual_rank", .integer(r.rank))) }
            return .object(entry)
        })
        return .object([
            ("version", .integer(1)), ("kind", .string("lora-agg-report")), ("tool_version", .string(loraAggToolVersion)),
            ("strategy", .object([("name", .string(options.strategyName)), ("version", .string(options.strategyVersion)),
                                  ("parameters", parameters)])),
            ("clients", clients), ("output_dtype", .string(dtype.rawValue)),
            ("extra_tensors", .object([("policy", .string(options.extraTensors.rawValue)), ("names", .array(extras.map { .string($0) }))])),
            ("residual_file", residual ? .string(residualName) : .null),
            ("client_adapters", perClient ? .string(clientsFolder) : .null),
            ("seconds", .number((seconds * 1000).rounded() / 1000)),
            ("modules", modules),
        ])
    }

    /// The index of client `k` among the clients of `module`'s round.
    static func positionOfClient(_ k: Int, module: String, adapters: [PeftAdapter]) -> Int? {
        guard adapters[k].modules[module] != nil else { return nil }
        return adapters[0..<k].filter { $0.modules[module] != nil }.count
    }

    /// Folder base names made unique (`a`, `a-2`), used as client ids and per-client folder names.
    static func uniqueIDs(_ folders: [String]) -> [String] {
        var used = Set<String>()
        return folders.map { folder in
            var base = URL(fileURLWithPath: folder).standardizedFileURL.lastPathComponent
            if base.isEmpty || base == "/" || base == "." { base = "client" }
            var id = base, n = 2
            while !used.insert(id).inserted { id = "\(base)-\(n)"; n += 1 }
            return id
        }
    }

    /// Moves the finished temporary folder to `path`, replacing an existing
    /// output only after the new one is complete.
    static func install(_ temporary: String, at path: String, force: Bool) throws {
        if FileManager.default.fileExists(atPath: path) {
            guard force else { throw AdapterError(.outputExists, "output '\(path)' already exists; pass --force to replace it") }
            let url = URL(fileURLWithPath: path)
            let old = url.deletingLastPathComponent().path + "/." + url.lastPathComponent + ".old-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            guard rename(path, old) == 0 else {
                throw AdapterError(.invalidOutput, "could not move the existing output '\(path)' aside: \(String(cString: strerror(errno)))")
            }
            guard rename(temporary, path) == 0 else {
                let reason = String(cString: strerror(errno))
                rename(old, path)
                throw AdapterError(.invalidOutput, "could not move the new output into '\(path)': \(reason)")
            }
            try? FileManager.default.removeItem(atPath: old)
        } else {
            guard rename(temporary, path) == 0 else {
                throw AdapterError(.invalidOutput, "could not move the new output into '\(path)': \(String(cString: strerror(errno)))")
            }
        }
        AtomicFile.syncFolder(URL(fileURLWithPath: path).deletingLastPathComponent().path)
    }
}

/// One result slot per module; each concurrent task writes only its own index.
final class ResultSlots: @unchecked Sendable {
    let buffer: UnsafeMutableBufferPointer<Result<AggregationResult, Error>?>
    init(count: Int) {
        buffer = .allocate(capacity: max(count, 1))
        buffer.initialize(repeating: nil)
    }
    deinit {
        buffer.deinitialize()
        buffer.deallocate()
    }
}

/// A progress line on standard error, redrawn in place.
final class Progress: @unchecked Sendable {
    private let total: Int
    private let enabled: Bool
    private var done = 0
    private let lock = NSLock()

    init(total: Int, enabled: Bool) {
        self.total = total
        self.enabled = enabled
    }

    func step() {
        guard enabled else { return }
        lock.lock()
        done += 1
        let line = "\raggregating modules \(done)/\(total)"
        lock.unlock()
        FileHandle.standardError.write(Data(line.utf8))
    }

    func finish() {
        guard enabled else { return }
        FileHandle.standardError.write(Data("\n".utf8))
    }
}
