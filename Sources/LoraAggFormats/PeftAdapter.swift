import Foundation
import LoraAggCore

/// Why an adapter folder or a set of client adapters was refused.
/// Messages name the client folder, the module and what was expected.
public struct AdapterError: Error, CustomStringConvertible, Sendable, Equatable {
    /// One kind per check, for tests.
    public enum Kind: String, Sendable {
        case missingFile, invalidConfig, unsupportedAdapterType, dora, embeddingLoRA, unpairedModule
        case unrecognizedTensor, notTargeted, rankMismatch, factorShapeMismatch
        case baseModelMismatch, missingModule, moduleShapeMismatch, fanInFanOutMismatch
        case extraTensorMismatch, extraTensorsRefused, noModules
        case outputExists, outputIsInput, invalidOutput
    }
    public var kind: Kind
    public var message: String
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }
}

/// The parts of `adapter_config.json` that decide how tensors are read,
/// with the full JSON kept (in key order) so unknown keys survive.
public struct AdapterConfig: Sendable {
    /// The whole file, in its key order.
    public var json: JSONValue
    public var r: Int
    public var loraAlpha: Double
    public var useRslora: Bool
    /// Pattern key → rank, in file order (first match wins, as in PEFT).
    public var rankPattern: [(String, Int)]
    /// Pattern key → alpha, in file order.
    public var alphaPattern: [(String, Double)]
    /// `target_modules`: a list of names, a regex, `all-linear`, or absent.
    public var targetModules: JSONValue?
    public var fanInFanOut: Bool
    public var modulesToSave: [String]
    public var baseModel: String?

    /// Parses and checks the config; `file` is used in messages.
    public init(json: JSONValue, file: String) throws {
        func bad(_ detail: String) -> AdapterError { AdapterError(.invalidConfig, "invalid adapter config '\(file)': \(detail)") }
        guard json.objectMembers != nil else { throw bad("expected a JSON object, got \(json.typeName)") }
        self.json = json
        guard let peftType = json["peft_type"]?.stringValue else { throw bad("missing 'peft_type'; expected \"LORA\"") }
        guard peftType == "LORA" else {
            throw AdapterError(.unsupportedAdapterType, "adapter '\(file)' is a \(peftType) adapter; only LoRA adapters (peft_type \"LORA\") can be aggregated")
        }
        if json["use_dora"]?.boolValue == true {
            throw AdapterError(.dora, "adapter '\(file)' uses DoRA (use_dora: true); DoRA magnitude vectors cannot be aggregated as LoRA factors, train without DoRA")
        }
        guard let r = json["r"]?.intValue, r > 0 else { throw bad("'r' must be a positive integer") }
        self.r = r
        let alpha = json["lora_alpha"] ?? .integer(8)
        guard let loraAlpha = alpha.doubleValue, loraAlpha > 0, loraAlpha.isFinite else { throw bad("'lora_alpha' must be a positive number") }
        self.loraAlpha = loraAlpha
        let rslora = json["use_rslora"] ?? .bool(false)
        guard let useRslora = rslora.boolValue else { throw bad("'use_rslora' must be true or false") }
        self.useRslora = useRslora
        var rankPattern: [(String, Int)] = []
        if let pattern = json["rank_pattern"], !pattern.isNull {
            guard let members = pattern.objectMembers else { throw bad("'rank_pattern' must be an object") }
            for (key, value) in members {
                guard let rank = value.intValue, rank > 0 else { throw bad("rank_pattern '\(key)' must be a positive integer") }
                rankPattern.append((key, rank))
            }
        }
        self.rankPattern = rankPattern
        var alphaPattern: [(String, Double)] = []
        if let pattern = json["alpha_pattern"], !pattern.isNull {
            guard let members = pattern.objectMembers else { throw bad("'alpha_pattern' must be an object") }
            for (key, value) in members {
                guard let a = value.doubleValue, a > 0, a.isFinite else { throw bad("alpha_pattern '\(key)' must be a positive number") }
                alphaPattern.append((key, a))
            }
        }
        self.alphaPattern = alphaPattern
        for key in rankPattern.map(\.0) + alphaPattern.map(\.0) where Self.patternRegex(key) == nil {
            throw bad("pattern key '\(key)' is not a valid regular expression")
        }
        let target = json["target_modules"]
        self.targetModules = (target?.isNull ?? true) ? nil : target
        let fan = json["fan_in_fan_out"] ?? .bool(false)
        guard let fanInFanOut = fan.boolValue else { throw bad("'fan_in_fan_out' must be true or false") }
        self.fanInFanOut = fanInFanOut
        if let save = json["modules_to_save"], !save.isNull {
            guard let items = save.arrayValue?.compactMap(\.stringValue) else { throw bad("'modules_to_save' must be a list of names") }
            self.modulesToSave = items
        } else {
            self.modulesToSave = []
        }
        if let base = json["base_model_name_or_path"], !base.isNull {
            guard let text = base.stringValue else { throw bad("'base_model_name_or_path' must be a string or null") }
            self.baseModel = text
        } else {
            self.baseModel = nil
        }
    }

    /// The regex PEFT's `get_pattern_key` builds for a pattern key.
    static func patternRegex(_ key: String) -> NSRegularExpression? {
        try? NSRegularExpression(pattern: "^(?:.*\\.)?(?:\(key))$")
    }

    /// The first pattern key matching `module` (PEFT `get_pattern_key`: a
    /// suffix regex on the module path, first match in file order wins).
    static func matchingKey(_ keys: [String], module: String) -> String? {
        let range = NSRange(module.startIndex..., in: module)
        return keys.first { key in
            guard let regex = patternRegex(key) else { return false }
            return regex.firstMatch(in: module, options: [], range: range) != nil
        }
    }

    /// The rank PEFT gives `module`.
    public func rank(for module: String) -> Int {
        guard let key = Self.matchingKey(rankPattern.map(\.0), module: module) else { return r }
        return rankPattern.first { $0.0 == key }!.1
    }

    /// The alpha PEFT gives `module`.
    public func alpha(for module: String) -> Double {
        guard let key = Self.matchingKey(alphaPattern.map(\.0), module: module) else { return loraAlpha }
        return alphaPattern.first { $0.0 == key }!.1
    }

    /// PEFT's scaling for `module`: α/r, or α/√r with rsLoRA.
    public func scaling(for module: String) -> Double {
        let rank = Double(self.rank(for: module))
        return alpha(for: module) / (useRslora ? rank.squareRoot() : rank)
    }

    /// Whether `target_modules` selects `module` (PEFT: a list matches the
    /// module name or its last components; a string is a full-match regex).
    public func targets(_ module: String) -> Bool {
        guard let targetModules else { return true }
        if let text = targetModules.stringValue {
            if text == "all-linear" { return true }
            guard let regex = try? NSRegularExpression(pattern: "^(?:\(text))$") else { return true }
            return regex.firstMatch(in: module, options: [], range: NSRange(module.startIndex..., in: module)) != nil
        }
        guard let names = targetModules.arrayValue?.compactMap(\.stringValue) else { return true }
        return names.contains { module == $0 || module.hasSuffix("." + $0) }
    }
}

/// One LoRA module of an adapter: its A and B tensors, paired by key name.
public struct LoraModuleInfo: Sendable {
    /// Module path without the `base_model.model.` prefix.
    public var name: String
    public var a: TensorInfo
    public var b: TensorInfo
    public var rank: Int { a.shape[0] }
    public var dIn: Int { a.shape[1] }
    public var dOut: Int { b.shape[0] }
    /// PEFT's scaling for this module.
    public var scaling: Double
}

/// A PEFT LoRA adapter folder, validated and memory-mapped.
public final class PeftAdapter: @unchecked Sendable {
    /// The prefix PEFT puts before every module path.
    public static let prefix = "base_model.model."
    public static let configName = "adapter_config.json"
    public static let weightsName = "adapter_model.safetensors"

    /// The folder, as given.
    public let folder: String
    public let config: AdapterConfig
    public let file: SafeTensorsFile
    /// LoRA modules by name.
    public let modules: [String: LoraModuleInfo]
    /// Tensors that are not LoRA factors (modules_to_save copies, biases), by full key.
    public let extraTensors: [TensorInfo]

    /// Reads and checks an adapter folder.
    public init(folder: String) throws {
        self.folder = folder
        let configPath = folder + "/" + Self.configName
        let weightsPath = folder + "/" + Self.weightsName
        guard let configData = FileManager.default.contents(atPath: configPath) else {
            var isFolder: ObjCBool = false
            if !FileManager.default.fileExists(atPath: folder, isDirectory: &isFolder) || !isFolder.boolValue {
                throw AdapterError(.missingFile, "adapter folder '\(folder)' does not exist")
            }
            throw AdapterError(.missingFile, "adapter '\(folder)' has no \(Self.configName); expected a PEFT adapter folder (save_pretrained output)")
        }
        guard FileManager.default.fileExists(atPath: weightsPath) else {
            if FileManager.default.fileExists(atPath: folder + "/adapter_model.bin") {
                throw AdapterError(.missingFile, "adapter '\(folder)' has only adapter_model.bin (pickle); re-save it with safe_serialization=True")
            }
            throw AdapterError(.missingFile, "adapter '\(folder)' has no \(Self.weightsName)")
        }
        let json: JSONValue
        do { json = try JSONValue.parse([UInt8](configData)) } catch {
            throw AdapterError(.invalidConfig, "invalid adapter config '\(configPath)': not valid JSON: \(error)")
        }
        config = try AdapterConfig(json: json, file: configPath)
        file = try SafeTensorsFile(path: weightsPath)

        var halves: [String: (a: TensorInfo?, b: TensorInfo?)] = [:]
        var extras: [TensorInfo] = []
        for tensor in file.tensors {
            let name = tensor.name
            if name.contains("lora_magnitude_vector") {
                throw AdapterError(.dora, "adapter '\(folder)': tensor '\(name)' is a DoRA magnitude vector; DoRA adapters cannot be aggregated as LoRA factors")
            }
            if name.contains("lora_embedding_A") || name.contains("lora_embedding_B") {
                throw AdapterError(.embeddingLoRA, "adapter '\(folder)': tensor '\(name)' is an embedding LoRA factor; embedding LoRA is not supported (drop the embedding from target_modules)")
            }
            let isA = name.hasSuffix(".lora_A.weight"), isB = name.hasSuffix(".lora_B.weight")
            if !isA && !isB {
                if name.split(separator: ".").contains(where: { $0.hasPrefix("lora_") }) {
                    throw AdapterError(.unrecognizedTensor, "adapter '\(folder)': unrecognized LoRA tensor '\(name)'; expected '<module>.lora_A.weight' and '<module>.lora_B.weight'")
                }
                extras.append(tensor)
                continue
            }
            var module = String(name.dropLast(".lora_A.weight".count))
            guard module.hasPrefix(Self.prefix) else {
                throw AdapterError(.unrecognizedTensor, "adapter '\(folder)': LoRA tensor '\(name)' does not start with '\(Self.prefix)'")
            }
            module.removeFirst(Self.prefix.count)
            guard tensor.shape.count == 2, tensor.dtype.isFloatConvertible else {
                throw AdapterError(.factorShapeMismatch, "adapter '\(folder)': tensor '\(name)' is \(tensor.dtype.rawValue) \(tensor.shape); expected a 2-D F32, F16, BF16 or F64 matrix")
            }
            if isA { halves[module, default: (nil, nil)].a = tensor } else { halves[module, default: (nil, nil)].b = tensor }
        }
        var modules: [String: LoraModuleInfo] = [:]
        for (module, pair) in halves {
            guard let a = pair.a, let b = pair.b else {
                throw AdapterError(.unpairedModule, "adapter '\(folder)': module '\(module)' has \(pair.a == nil ? "lora_B but no lora_A" : "lora_A but no lora_B"); both factors are needed")
            }
            if a.shape[0] != b.shape[1] {
                throw AdapterError(.factorShapeMismatch, "adapter '\(folder)': module '\(module)' has lora_A \(a.shape) and lora_B \(b.shape); expected [r, in] and [out, r] with the same r")
            }
            let configured = config.rank(for: module)
            if a.shape[0] != configured {
                throw AdapterError(.rankMismatch, "adapter '\(folder)': module '\(module)' has rank \(a.shape[0]) in its tensors but adapter_config.json gives r=\(configured) (r / rank_pattern); PEFT would refuse to load it")
            }
            if a.shape[0] == 0 {
                throw AdapterError(.factorShapeMismatch, "adapter '\(folder)': module '\(module)' has rank 0")
            }
            if !config.targets(module) {
                throw AdapterError(.notTargeted, "adapter '\(folder)': module '\(module)' is not selected by target_modules \(config.targetModules?.compact ?? "")")
            }
            modules[module] = LoraModuleInfo(name: module, a: a, b: b, scaling: config.scaling(for: module))
        }
        if modules.isEmpty {
            throw AdapterError(.noModules, "adapter '\(folder)' has no LoRA modules (no '<module>.lora_A.weight' tensors)")
        }
        self.modules = modules
        self.extraTensors = extras.sorted { $0.name < $1.name }
    }

    /// Module names, sorted.
    public var moduleNames: [String] { modules.keys.sorted() }

    /// The dtype all LoRA factors share, or nil when they differ.
    public var loraDType: DType? {
        let types = Set(modules.values.flatMap { [$0.a.dtype, $0.b.dtype] })
        return types.count == 1 ? types.first : nil
    }
}

/// Writes PEFT adapter folders.
public enum AdapterWriter {
    /// The output rank and alpha of each module, turned into `r`, `lora_alpha`,
    /// and `rank_pattern` / `alpha_pattern` for the modules that differ from
    /// the most common values. Unknown keys of `base` are kept.
    ///
    /// alpha = s·R, or s·√R with rsLoRA, so PEFT's scaling reproduces s.
    public static func config(from base: JSONValue, modules: [(name: String, rank: Int, scaling: Double)],
                              useRslora: Bool) throws -> JSONValue {
        let alphas = modules.map { module -> Double in
            let raw = module.scaling * (useRslora ? Double(module.rank).squareRoot() : Double(module.rank))
            let nearest = raw.rounded()
            return abs(raw - nearest) <= 1e-9 * max(1, abs(raw)) ? nearest : raw
        }
        func mostCommon<T: Hashable & Comparable>(_ values: [T]) -> T {
            var counts: [T: Int] = [:]
            for value in values { counts[value, default: 0] += 1 }
            return counts.max { ($0.value, $1.key) < ($1.value, $0.key) }!.key
        }
        let r = mostCommon(modules.map(\.rank))
        let alpha = mostCommon(alphas)
        var json = base
        json.set("r", .integer(r))
        json.set("lora_alpha", .number(alpha))
        json.set("use_rslora", .bool(useRslora))
        let rankPattern = modules.filter { $0.rank != r }.map { ($0.name, JSONValue.integer($0.rank)) }
        let alphaPattern = zip(modules, alphas).filter { $0.1 != alpha }.map { ($0.0.name, JSONValue.number($0.1)) }
        json.set("rank_pattern", .object(rankPattern))
        json.set("alpha_pattern", .object(alphaPattern))
        // Check the config against PEFT's own resolution rule.
        let check = try AdapterConfig(json: json, file: "<output config>")
        for (module, expectedAlpha) in zip(modules, alphas) {
            let rank = check.rank(for: module.name), a = check.alpha(for: module.name)
            if rank != module.rank || a != expectedAlpha {
                throw AdapterError(.invalidOutput, "could not express the ranks and alphas of module '\(module.name)' in adapter_config.json (pattern resolves to r=\(rank), alpha=\(a); expected r=\(module.rank), alpha=\(expectedAlpha))")
            }
        }
        return json
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `folder` (which must exist).
    public static func write(folder: String, config: JSONValue, tensors: [TensorToWrite], metadata: [(String, String)]) throws {
        try SafeTensorsWriter.write(tensors, metadata: metadata, to: folder + "/" + PeftAdapter.weightsName)
        try AtomicFile.write(text: config.pretty, to: folder + "/" + PeftAdapter.configName)
    }
}
