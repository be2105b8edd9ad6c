import Foundation
import Testing
import LoraAggCore
import LoraAggHost

/// Builds small C shared objects for the loader's failure cases.
enum CPluginFactory {
    /// The folder holding lora_agg.h.
    static let includeFolder = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Sources/CLoraAggABI/include").path

    /// A fresh temporary folder.
    static func temporaryFolder() throws -> String {
        let path = NSTemporaryDirectory() + "lora-agg-tests-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// Compiles C source into `folder/lib<name>.so` and returns its path.
    static func compile(_ source: String, name: String, in folder: String) throws -> String {
        let sourcePath = folder + "/\(name).c", output = folder + "/lib\(name).so"
        try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["cc", "-shared", "-fPIC", "-I", includeFolder, sourcePath, "-o", output]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw CocoaError(.fileWriteUnknown) }
        return output
    }

    /// A minimal plugin whose descriptor fields can be overridden by C initialisers.
    static func plugin(abiMajor: String = "LORA_AGG_ABI_MAJOR", name: String = "tiny", aggregate: String = "aggregate") -> String {
        """
        #include "lora_agg.h"
        static lora_agg_status create(const char *c, const lora_agg_host_api *h, void **s, char *e, size_t n) { *s = (void *)1; return LORA_AGG_OK; }
        static lora_agg_status aggregate(void *s, const lora_agg_round *r, lora_agg_result *o, char *e, size_t n) { return LORA_AGG_INTERNAL_ERROR; }
        static void free_result(void *s, lora_agg_result *r) {}
        static void destroy(void *s) {}
        static const lora_agg_plugin descriptor = {
            .abi_major = \(abiMajor), .abi_minor = 0, .struct_size = sizeof(lora_agg_plugin),
            .name = "\(name)", .version = "1.0.0", .summary = "A test plugin.", .citation = "None, test fixture",
            .description = "", .parameters_schema = "[]", .capabilities = 0,
            .create = create, .aggregate = \(aggregate), .free_result = free_result, .destroy = destroy };
        __attribute__((visibility("default"))) const lora_agg_plugin *lora_agg_plugin_entry(void) { return &descriptor; }
        """
    }
}

@Suite("plugin loader errors")
struct LoaderTests {
    @Test("a missing path is named")
    func missingPath() throws {
        let error = #expect(throws: LoaderError.self) { try PluginRegistry(paths: ["/nonexistent/plugins"]) }
        #expect(error == .pathMissing(path: "/nonexistent/plugins"))
        #expect(error?.description.contains("Could not find plugin path '/nonexistent/plugins'") == true)
    }

    @Test("a file that is not a shared object is refused with dlopen's reason")
    func notSharedObject() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let path = folder + "/libfake.so"
        try "not an ELF file".write(toFile: path, atomically: true, encoding: .utf8)
        let error = #expect(throws: LoaderError.self) { try PluginLoader.load(path: path) }
        guard case .notSharedObject(let failed, let reason)? = error else { Issue.record("wrong error \(String(describing: error))"); return }
        #expect(failed == path)
        #expect(!reason.isEmpty)
        #expect(error?.description.contains("not a loadable shared object") == true)
    }

    @Test("a shared object without the entry symbol is refused when named, and ignored in a folder")
    func missingEntry() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let path = try CPluginFactory.compile("int helper(void) { return 1; }", name: "helper", in: folder)
        let error = #expect(throws: LoaderError.self) { try PluginLoader.load(path: path) }
        #expect(error == .missingEntrySymbol(path: path))
        #expect(error?.description.contains("does not export 'lora_agg_plugin_entry'") == true)
        let registry = try PluginRegistry(paths: [folder])
        #expect(registry.plugins.isEmpty)
    }

    @Test("a plugin built for another ABI major version is refused with both versions")
    func abiMismatch() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let path = try CPluginFactory.compile(CPluginFactory.plugin(abiMajor: "2"), name: "future", in: folder)
        let error = #expect(throws: LoaderError.self) { try PluginLoader.load(path: path) }
        #expect(error == .abiMismatch(path: path, pluginMajor: 2, hostMajor: 1))
        #expect(error?.description.contains("built for ABI 2, this host speaks 1") == true)
    }

    @Test("a descriptor with a NULL function is refused naming the field")
    func missingField() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let path = try CPluginFactory.compile(CPluginFactory.plugin(aggregate: "0"), name: "hollow", in: folder)
        let error = #expect(throws: LoaderError.self) { try PluginLoader.load(path: path) }
        #expect(error == .missingField(path: path, field: "aggregate"))
    }

    @Test("invalid metadata is refused with the problem")
    func invalidMetadata() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let path = try CPluginFactory.compile(CPluginFactory.plugin(name: "Not Kebab"), name: "badname", in: folder)
        let error = #expect(throws: LoaderError.self) { try PluginLoader.load(path: path) }
        #expect(error?.description.contains("name 'Not Kebab' is not kebab-case") == true)
    }

    @Test("two plugins with the same name are refused naming both files")
    func duplicateNames() throws {
        let first = try CPluginFactory.temporaryFolder(), second = try CPluginFactory.temporaryFolder()
        let one = try CPluginFactory.compile(CPluginFactory.plugin(name: "twin"), name: "twin", in: first)
        let two = try CPluginFactory.compile(CPluginFactory.plugin(name: "twin"), name: "twin", in: second)
        let error = #expect(throws: LoaderError.self) { try PluginRegistry(paths: [first, second]) }
        #expect(error == .duplicateName(name: "twin", first: one, second: two))
        #expect(error?.description.contains("'\(one)' and '\(two)' both define it") == true)
        // The same folder reached twice is not a duplicate.
        #expect(try PluginRegistry(paths: [first, first]).names == ["twin"])
    }

    @Test("an unknown strategy lists the known ones and suggests the closest")
    func unknownStrategy() throws {
        let error = #expect(throws: LoaderError.self) { try TestSupport.registry.plugin(named: "fedt") }
        guard case .unknownStrategy(let name, let known, let suggestion)? = error else { Issue.record("wrong error"); return }
        #expect(name == "fedt")
        #expect(known.contains("fedit"))
        #expect(suggestion == "fedit")
        #expect(error?.description.contains("Did you mean 'fedit'?") == true)
    }

    @Test("no plugins at all says where it looked and that swift build builds them")
    func noPlugins() throws {
        let empty = try CPluginFactory.temporaryFolder()
        let error = #expect(throws: LoaderError.self) { try PluginRegistry.discover(searching: [empty]) }
        #expect(error == .noPluginsFound(searched: [empty]))
        #expect(error?.description.contains("Looked in '\(empty)'") == true)
        #expect(error?.description.contains("`swift run lora-agg` alone builds the tool but not the plugins") == true)
    }

    @Test("search order is --plugin-path, then LORA_AGG_PLUGIN_PATH, then the executable's folder")
    func searchOrder() {
        let paths = PluginLoader.searchPaths(explicit: ["/x"], environment: ["LORA_AGG_PLUGIN_PATH": "/a::/b"])
        #expect(Array(paths.prefix(3)) == ["/x", "/a", "/b"])
        #expect(paths.last == PluginLoader.executableFolder)
    }

    @Test("a plugin's error reaches the host with its category and message")
    func errorsCrossTheBoundary() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let path = try CPluginFactory.compile(CPluginFactory.plugin(name: "failing"), name: "failing", in: folder)
        let aggregator = try PluginLoader.load(path: path).makeAggregator()
        var generator = TestSupport.SeededGenerator(seed: 3)
        let clients = [TestSupport.randomClient("c", rank: 2, dOut: 3, dIn: 4, &generator)]
        #expect(throws: AggregationError.internalError("aggregate failed")) {
            try ModuleRound.withRound(module: "m", dOut: 3, dIn: 4, clients: clients) { try aggregator.aggregate($0) }
        }
    }
}
