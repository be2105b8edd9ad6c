/// Why a plugin could not be found, loaded or chosen.
///
/// Messages follow the project's error style: a one-line primary message
/// with names in single quotes, then `Detail:` facts and a `Hint:` fix.
public enum LoaderError: Error, Equatable, CustomStringConvertible, Sendable {
    /// A path given by the user does not exist.
    case pathMissing(path: String)
    /// `dlopen` refused the file.
    case notSharedObject(path: String, reason: String)
    /// The shared object does not export the entry symbol.
    case missingEntrySymbol(path: String)
    /// The plugin was built for another ABI major version.
    case abiMismatch(path: String, pluginMajor: UInt32, hostMajor: UInt32)
    /// The descriptor is smaller than the ABI 1.0 descriptor.
    case descriptorTooSmall(path: String, size: UInt32, minimum: Int)
    /// A required descriptor field is NULL.
    case missingField(path: String, field: String)
    /// The descriptor's metadata is malformed.
    case invalidMetadata(path: String, problems: [String])
    /// Two files define the same strategy name.
    case duplicateName(name: String, first: String, second: String)
    /// No loaded plugin has this name.
    case unknownStrategy(name: String, known: [String], suggestion: String?)
    /// No plugin was found in any searched folder.
    case noPluginsFound(searched: [String])

    public var description: String {
        switch self {
        case .pathMissing(let path):
            return "Could not find plugin path '\(path)'\nDetail: No file or folder exists at this path.\nHint: Check --plugin-path and LORA_AGG_PLUGIN_PATH."
        case .notSharedObject(let path, let reason):
            return "Could not load plugin '\(path)': not a loadable shared object\nDetail: \(reason)\nHint: Plugins are lib<Name>.so files built with `swift build` or `cc -shared`."
        case .missingEntrySymbol(let path):
            return "Could not load plugin '\(path)': it does not export 'lora_agg_plugin_entry'\nDetail: The shared object loaded, but has no entry symbol, so it is not a lora-agg plugin.\nHint: Swift plugins need a public @_cdecl(\"lora_agg_plugin_entry\") function; see docs/writing-a-plugin.md."
        case .abiMismatch(let path, let plugin, let host):
            return "Could not load plugin '\(path)': built for ABI \(plugin), this host speaks \(host)\nDetail: Plugin ABI major version is \(plugin); this host supports \(host).\nHint: Rebuild the plugin against this release's lora_agg.h."
        case .descriptorTooSmall(let path, let size, let minimum):
            return "Could not load plugin '\(path)': descriptor is \(size) bytes\nDetail: An ABI 1.0 descriptor has at least \(minimum) bytes.\nHint: Rebuild the plugin against this release's lora_agg.h."
        case .missingField(let path, let field):
            return "Could not load plugin '\(path)': required field '\(field)' is NULL\nDetail: Every plugin must provide '\(field)'.\nHint: Fill it in the descriptor the entry function returns."
        case .invalidMetadata(let path, let problems):
            return "Could not load plugin '\(path)': invalid metadata\nDetail: \(problems.joined(separator: "; "))."
        case .duplicateName(let name, let first, let second):
            return "Two plugins are named '\(name)'\nDetail: '\(first)' and '\(second)' both define it.\nHint: Remove one of them from the plugin path, or rename one."
        case .unknownStrategy(let name, let known, let suggestion):
            var text = "Unrecognized strategy '\(name)'"
            text += "\nDetail: Known strategies: \(known.isEmpty ? "(none)" : known.joined(separator: ", "))."
            if let suggestion { text += "\nHint: Did you mean '\(suggestion)'?" }
            return text
        case .noPluginsFound(let searched):
            return "No plugins found\nDetail: Looked in \(searched.isEmpty ? "no folder" : searched.map { "'\($0)'" }.joined(separator: ", ")).\nHint: Run `swift build` first; `swift run lora-agg` alone builds the tool but not the plugins. Or point --plugin-path or LORA_AGG_PLUGIN_PATH at a folder of lib*.so plugins."
        }
    }
}
