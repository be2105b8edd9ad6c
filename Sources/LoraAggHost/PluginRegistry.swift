import Foundation
import LoraAggCore

/// The loaded strategies, by name.
///
/// A value: the CLI builds one at start-up, tests build their own. Names are
/// unique; a second file defining a known name is an error naming both files.
public struct PluginRegistry: Sendable {
    /// Loaded plugins by strategy name.
    public private(set) var plugins: [String: LoadedPlugin] = [:]
    /// The folders and files that were searched, for messages.
    public private(set) var searched: [String] = []
    /// Files in searched folders that looked like plugins but failed to load.
    public private(set) var skipped: [(path: String, error: LoaderError)] = []

    /// An empty registry.
    public init() {}

    /// Loads every plugin from `paths` (files or folders), in order.
    ///
    /// An explicit file must be a valid plugin. In folders, `lib*.so` files
    /// without the entry symbol are ignored, and files that fail to load are
    /// recorded in ``skipped``. The same file reached twice is loaded once.
    public init(paths: [String]) throws {
        var seenFiles = Set<String>()
        for path in paths {
            var isFolder: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isFolder) else {
                throw LoaderError.pathMissing(path: path)
            }
            searched.append(path)
            if !isFolder.boolValue {
                let real = Self.realPath(path)
                if seenFiles.insert(real).inserted { try register(PluginLoader.load(path: path)) }
                continue
            }
            for file in PluginLoader.candidates(in: path) where PluginLoader.exportsEntrySymbol(file) {
                guard seenFiles.insert(Self.realPath(file)).inserted else { continue }
                do {
                    try register(PluginLoader.load(path: file))
                } catch let error as LoaderError {
                    if case .duplicateName = error { throw error }
                    skipped.append((file, error))
                }
            }
        }
    }

    /// Loads from the standard search order (see ``PluginLoader/searchPaths(explicit:environment:includeExecutableFolder:)``)
    /// and fails when nothing was found.
    public static func discover(explicit: [String] = []) throws -> PluginRegistry {
        try discover(searching: PluginLoader.searchPaths(explicit: explicit))
    }

    /// Loads from exactly `paths` and fails when nothing was found.
    public static func discover(searching paths: [String]) throws -> PluginRegistry {
        let registry = try PluginRegistry(paths: paths)
        if registry.plugins.isEmpty {
            if let first = registry.skipped.first { throw first.error }
            throw LoaderError.noPluginsFound(searched: registry.searched)
        }
        return registry
    }

    /// Adds a plugin; refuses a second plugin of the same name.
    public mutating func register(_ plugin: LoadedPlugin) throws {
        if let existing = plugins[plugin.info.name] {
            throw LoaderError.duplicateName(name: plugin.info.name, first: existing.path, second: plugin.path)
        }
        plugins[plugin.info.name] = plugin
    }

    /// Strategy names, sorted.
    public var names: [String] { plugins.keys.sorted() }

    /// The plugin called `name`, or an error listing the known names and the nearest one.
    public func plugin(named name: String) throws -> LoadedPlugin {
        if let plugin = plugins[name] { return plugin }
        throw LoaderError.unknownStrategy(name: name, known: names, suggestion: closestName(to: name, among: names))
    }

    private static func realPath(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
