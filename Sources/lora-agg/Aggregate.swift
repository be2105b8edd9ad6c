import ArgumentParser
import Foundation
import LoraAggCore
import LoraAggFormats
import LoraAggHost

extension ExtraTensorPolicy: ExpressibleByArgument {}

extension LoraAgg {
    /// `lora-agg aggregate`
    struct Aggregate: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "aggregate",
            abstract: "Aggregate client adapters with a strategy and write a PEFT adapter.",
            discussion: """
                Each --client is a PEFT LoRA adapter folder (adapter_config.json and \
                adapter_model.safetensors), optionally followed by =SAMPLES (default 1). The output \
                folder receives adapter_config.json, adapter_model.safetensors and report.json; \
                strategies with a base-weight residual add residual.safetensors, and strategies \
                with per-client payloads add clients/<id>/. The output is built beside --out and \
                renamed into place, so a failed run leaves nothing behind.
                """)

        @Option(help: "The strategy name, as `lora-agg list` shows it.")
        var strategy: String

        @Option(name: .customLong("client"), help: ArgumentHelp("A client adapter folder, optionally with its sample count (repeatable).", valueName: "dir[=samples]"))
        var clients: [String] = []

        @Option(help: ArgumentHelp("The output adapter folder.", valueName: "dir"))
        var out: String

        @Option(name: .customLong("param"), help: ArgumentHelp("A strategy hyperparameter (repeatable); see `lora-agg describe NAME`.", valueName: "key=value"))
        var parameters: [String] = []

        @Flag(help: "Replace an existing output folder.")
        var force = false

        @Option(help: ArgumentHelp("The dtype of the written factors (default: the inputs' dtype).", valueName: "f32|f16|bf16|f64"))
        var dtype: String?

        @Option(name: .customLong("extra-tensors"), help: ArgumentHelp("What to do with non-LoRA tensors such as modules_to_save heads.", valueName: "average|first|drop|error"))
        var extraTensors: ExtraTensorPolicy = .average

        @Flag(name: .customLong("allow-partial-modules"), help: "Aggregate a module present in only some clients over the clients that have it.")
        var allowPartialModules = false

        @Flag(help: "Print nothing but errors.")
        var quiet = false

        @Option(help: ArgumentHelp("The federated round number, from 0, passed to the strategy.", valueName: "n"))
        var round = 0

        @Option(help: ArgumentHelp("For stateful strategies: the file holding the state kept across rounds; read if it exists, replaced after a successful run.", valueName: "file"))
        var state: String?

        @OptionGroup var plugins: PluginOptions

        func validate() throws {
            if clients.isEmpty { throw ValidationError("give at least one --client DIR[=SAMPLES]") }
            if round < 0 { throw ValidationError("invalid --round '\(round)'; expected a number >= 0") }
            if let dtype, DType(userSpelling: dtype) == nil {
                throw ValidationError("invalid --dtype '\(dtype)'; expected f32, f16, bf16 or f64")
            }
        }

        func run() throws {
            let specs = try clients.map { try ClientSpec(parsing: $0) }
            let plugin = try plugins.registry().plugin(named: strategy)
            let aggregator = try plugin.makeAggregator(assignments: parameters)
            let stateful = plugin.info.capabilities.contains(.stateful)
            if let state {
                guard stateful else {
                    throw ValidationError("strategy '\(plugin.info.name)' keeps no state across rounds; drop --state '\(state)'")
                }
                if FileManager.default.fileExists(atPath: state) {
                    guard let bytes = FileManager.default.contents(atPath: state) else {
                        throw ValidationError("could not read state file '\(state)'")
                    }
                    try aggregator.loadState(Array(bytes))
                }
            } else if stateful, !quiet {
                printError("warning: '\(plugin.info.name)' keeps state across rounds; without --state FILE it starts afresh and its state is lost after this run")
            }
            let options = AggregationOptions(
                strategyName: plugin.info.name, strategyVersion: plugin.info.version,
                parametersJSON: aggregator.parameters.json, dtype: dtype.flatMap { DType(userSpelling: $0) },
                extraTensors: extraTensors, allowPartialModules: allowPartialModules, force: force,
                progress: !quiet && isatty(STDERR_FILENO) != 0, roundIndex: round)
            let summary = try AggregationJob.run(clients: specs, aggregator: aggregator, options: options, output: out)
            if let state, let bytes = try aggregator.saveState() {
                try AtomicFile.write(bytes, to: state)
            }
            if !quiet {
                let ranks = Set(summary.outputRanks.values).sorted().map(String.init).joined(separator: ",")
                print("aggregated \(summary.modules) modules from \(specs.count) clients with \(plugin.info.name) (rank \(ranks)) in \(String(format: "%.2f", summary.seconds)) s")
                print("wrote \(summary.output)")
                if let residual = summary.residualFile { print("residual: \(residual) (apply with `lora-agg apply-residual`)") }
                if !summary.clientFolders.isEmpty { print("per-client adapters: \(summary.output)/\(AggregationJob.clientsFolder)/") }
                if let state, stateful { print("state: \(state) (round \(round))") }
            }
        }
    }
}
