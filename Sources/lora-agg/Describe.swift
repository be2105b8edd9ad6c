import ArgumentParser
import LoraAggCore
import LoraAggHost

extension LoraAgg {
    /// `lora-agg describe NAME`
    struct Describe: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a strategy's summary, citation, capabilities and hyperparameters.")

        @Argument(help: "The strategy name, as `lora-agg list` shows it.")
        var name: String

        @OptionGroup var plugins: PluginOptions

        func run() throws {
            let plugin = try plugins.registry().plugin(named: name)
            let info = plugin.info
            print("\(info.name) \(info.version)")
            print("  \(info.summary)")
            print("")
            print("Citation:     \(info.citation)")
            print("Capabilities: \(info.capabilities.names.isEmpty ? "none" : info.capabilities.names.joined(separator: ", "))")
            print("File:         \(plugin.path)")
            if !info.description.isEmpty {
                print("")
                print(wrap(info.description, width: 88, indent: ""))
            }
            print("")
            if info.parameters.isEmpty {
                print("Hyperparameters: none")
            } else {
                print("Hyperparameters (--param key=value):")
                for spec in info.parameters {
                    var range = ""
                    if let choices = spec.choices { range = " one of " + choices.joined(separator: "|") }
                    if spec.minimum != nil || spec.maximum != nil {
                        range = " in [\(spec.minimum.map { ParameterValue.number($0).description } ?? "-inf"), \(spec.maximum.map { ParameterValue.number($0).description } ?? "inf")]"
                    }
                    print("  \(spec.name) (\(spec.kind.rawValue), default \(spec.defaultValue))\(range)")
                    print(wrap(spec.help, width: 84, indent: "      "))
                }
            }
        }
    }
}
