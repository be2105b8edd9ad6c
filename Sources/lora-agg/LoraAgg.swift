import ArgumentParser
import Foundation
import LoraAggFormats
import LoraAggHost

/// The `lora-agg` command.
@main
struct LoraAgg: ParsableCommand {
    static func main() {
        ProcessTuning.configureForParallelModules()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            exit(withError: error)
        }
    }

    static let configuration = CommandConfiguration(
        commandName: "lora-agg",
        abstract: "Aggregate federated LoRA adapters with pluggable strategies.",
        discussion: """
            Strategies are plugins (lib*.so) found in --plugin-path, then in \
            LORA_AGG_PLUGIN_PATH (colon-separated), then next to this executable.
            """,
        version: loraAggToolVersion,
        subcommands: [List.self, Describe.self, Aggregate.self, Demo.self, Conformance.self, NewPlugin.self, ApplyResidual.self])
}

/// Options shared by every command that loads plugins.
struct PluginOptions: ParsableArguments {
    @Option(name: .customLong("plugin-path"), help: ArgumentHelp("A plugin file or folder to search first (repeatable).", valueName: "path"))
    var pluginPaths: [String] = []

    /// The registry from the standard search order.
    func registry() throws -> PluginRegistry { try PluginRegistry.discover(explicit: pluginPaths) }
}
