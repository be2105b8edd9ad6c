import ArgumentParser
import LoraAggHost

extension LoraAgg {
    /// `lora-agg list`
    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the strategies that were found, with their capabilities and files.")

        @OptionGroup var plugins: PluginOptions

        func run() throws {
            let registry = try plugins.registry()
            let rows = registry.names.map { name -> [String] in
                let plugin = registry.plugins[name]!
                let capabilities = plugin.info.capabilities.names
                return [name, plugin.info.version, capabilities.isEmpty ? "-" : capabilities.joined(separator: ","), plugin.path]
            }
            print(table(header: ["STRATEGY", "VERSION", "CAPABILITIES", "FILE"], rows: rows))
            for skipped in registry.skipped {
                printError("warning: skipped '\(skipped.path)': \(skipped.error.description.split(separator: "\n").first ?? "")")
            }
        }
    }
}
