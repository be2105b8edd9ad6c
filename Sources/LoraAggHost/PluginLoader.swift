import CLoraAggABI
import Foundation
import LoraAggCore

/// A strategy plugin loaded from a shared object, with its checked metadata.
///
/// Plugins are never unloaded: Swift images leave dangling metadata behind a
/// `dlclose`, so loading uses RTLD_NODELETE and the handle is kept for good.
public final class LoadedPlugin: @unchecked Sendable {
    /// The file the plugin came from.
    public let path: String
    /// Name, version, summary, citation, capabilities and hyperparameters.
    public let info: StrategyInfo
    /// The ABI minor version the plugin was built against.
    public let abiMinor: UInt32
    let descriptor: UnsafePointer<lora_agg_plugin>

    init(path: String, info: StrategyInfo, abiMinor: UInt32, descriptor: UnsafePointer<lora_agg_plugin>) {
        self.path = path
        self.info = info
        self.abiMinor = abiMinor
        self.descriptor = descriptor
    }

    /// Creates an instance with checked hyperparameters.
    public func makeAggregator(parameters: StrategyParameters) throws -> PluginAggregator {
        try PluginAggregator(plugin: self, parameters: parameters)
    }

    /// Creates an instance from command-line `key=value` strings.
    public func makeAggregator(assignments: [String] = []) throws -> PluginAggregator {
        try makeAggregator(parameters: StrategyParameters(specs: info.parameters, assignments: assignments))
    }
}

/// Finds and loads plugins.
public enum PluginLoader {
    /// The environment variable holding extra plugin folders, colon-separated.
    public static let environmentVariable = "LORA_AGG_PLUGIN_PATH"

    /// The folder of the running executable: the build-products folder for
    /// both `lora-agg` and the test bundle, where `swift build` puts the plugins.
    public static var executableFolder: String? {
        guard let executable = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        return (executable as NSString).deletingLastPathComponent
    }

    /// The search order: explicit paths, then `LORA_AGG_PLUGIN_PATH`, then the executable's folder.
    public static func searchPaths(explicit: [String], environment: [String: String] = ProcessInfo.processInfo.environment,
                                   includeExecutableFolder: Bool = true) -> [String] {
        var paths = explicit
        if let variable = environment[environmentVariable] {
            paths += variable.split(separator: ":").map(String.init).filter { !$0.isEmpty }
        }
        if includeExecutableFolder, let folder = executableFolder { paths.append(folder) }
        return paths
    }

    /// Loads one shared object and checks its descriptor.
    public static func load(path: String) throws -> LoadedPlugin {
        guard FileManager.default.fileExists(atPath: path) else { throw LoaderError.pathMissing(path: path) }
        let resolved = (path as NSString).standardizingPath
        guard let handle = dlopen(resolved, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) else {
            let reason = dlerror().map { String(cString: $0) } ?? "dlopen failed"
            throw LoaderError.notSharedObject(path: path, reason: reason)
        }
        // Never dlclose: see LoadedPlugin.
        guard let symbol = dlsym(handle, LORA_AGG_ENTRY_SYMBOL) else {
            throw LoaderError.missingEntrySymbol(path: path)
        }
        let entry = unsafeBitCast(symbol, to: (@convention(c) () -> UnsafePointer<lora_agg_plugin>?).self)
        guard let descriptor = entry() else { throw LoaderError.missingField(path: path, field: "descriptor (entry returned NULL)") }
        return try check(descriptor, path: path)
    }

    /// Checks a descriptor field by field; reads nothing past a wrong major version.
    static func check(_ descriptor: UnsafePointer<lora_agg_plugin>, path: String) throws -> LoadedPlugin {
        let raw = UnsafeRawPointer(descriptor)
        let major = raw.load(as: UInt32.self)
        guard major == UInt32(LORA_AGG_ABI_MAJOR) else {
            throw LoaderError.abiMismatch(path: path, pluginMajor: major, hostMajor: UInt32(LORA_AGG_ABI_MAJOR))
        }
        let d = descriptor.pointee
        let minimum = MemoryLayout<lora_agg_plugin>.size
        guard Int(d.struct_size) >= minimum else {
            throw LoaderError.descriptorTooSmall(path: path, size: d.struct_size, minimum: minimum)
        }
        func required(_ pointer: UnsafePointer<CChar>?, _ field: String) throws -> String {
            guard let pointer else { throw LoaderError.missingField(path: path, field: field) }
            return String(cString: pointer)
        }
        // Swift imports the C string and function fields as implicitly
        // unwrapped; a NULL from a C plugin must still be caught.
        let name = try required(Optional(d.name), "name")
        let version = try required(Optional(d.version), "version")
        let summary = try required(Optional(d.summary), "summary")
        let citation = try required(Optional(d.citation), "citation")
        let description = try required(Optional(d.description), "description")
        let schema = try required(Optional(d.parameters_schema), "parameters_schema")
        if Optional(d.create) == nil { throw LoaderError.missingField(path: path, field: "create") }
        if Optional(d.aggregate) == nil { throw LoaderError.missingField(path: path, field: "aggregate") }
        if Optional(d.free_result) == nil { throw LoaderError.missingField(path: path, field: "free_result") }
        if Optional(d.destroy) == nil { throw LoaderError.missingField(path: path, field: "destroy") }
        var problems: [String] = []
        if d.reserved != 0 { problems.append("reserved field is \(d.reserved); expected 0") }
        let known = Capabilities.named.reduce(Capabilities()) { $0.union($1.0) }
        if d.capabilities & ~known.rawValue != 0 {
            problems.append(String(format: "unknown capability bits 0x%llx", d.capabilities & ~known.rawValue))
        }
        let capabilities = Capabilities(rawValue: d.capabilities)
        if capabilities.contains(.stateful), d.save_state == nil || d.load_state == nil || d.free_bytes == nil {
            problems.append("declares 'stateful' but lacks save_state, load_state or free_bytes")
        }
        var parameters: [ParameterSpec] = []
        do { parameters = try ParameterSpec.decodeSchema(schema) } catch let error as AggregationError {
            problems.append(error.message)
        }
        let info = StrategyInfo(name: name, version: version, summary: summary, citation: citation,
                                description: description, capabilities: capabilities, parameters: parameters)
        problems += info.problems
        if !problems.isEmpty { throw LoaderError.invalidMetadata(path: path, problems: problems) }
        return LoadedPlugin(path: path, info: info, abiMinor: d.abi_minor, descriptor: descriptor)
    }

    /// The `lib*.so` files of a folder, sorted by name.
    static func candidates(in folder: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
        return names.filter { $0.hasPrefix("lib") && $0.hasSuffix(".so") }.sorted()
            .map { (folder as NSString).appendingPathComponent($0) }
    }

    /// Whether a shared object exports the entry symbol, read from its ELF
    /// dynamic symbol table without loading it (dlopen would run its constructors).
    static func exportsEntrySymbol(_ path: String) -> Bool {
        guard let data = FileManager.default.contents(atPath: path) else { return false }
        return data.range(of: Data(LORA_AGG_ENTRY_SYMBOL.utf8 + [0])) != nil
    }
}
