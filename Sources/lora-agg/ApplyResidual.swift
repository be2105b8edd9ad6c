import ArgumentParser
import LoraAggFormats

extension ResidualApplier.Orientation: ExpressibleByArgument {}

extension LoraAgg {
    /// `lora-agg apply-residual`
    struct ApplyResidual: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "apply-residual",
            abstract: "Add a strategy's factored base-weight residual to a base checkpoint.",
            discussion: """
                For every module in the residual file, adds U·V to the base tensor '<module>.weight' \
                (transposed for GPT-2 Conv1D weights stored [in, out]) and writes a new checkpoint; \
                all other tensors are copied unchanged.
                """)

        @Option(help: ArgumentHelp("The base model checkpoint.", valueName: "model.safetensors"))
        var base: String

        @Option(help: ArgumentHelp("The residual file written by `lora-agg aggregate`.", valueName: "file"))
        var residual: String

        @Option(help: ArgumentHelp("The checkpoint to write.", valueName: "file"))
        var out: String

        @Option(help: ArgumentHelp("Base weight layout: auto (residual metadata and shapes), linear ([out, in]) or conv1d ([in, out]).", valueName: "auto|linear|conv1d"))
        var layout: ResidualApplier.Orientation = .auto

        @Flag(help: "Replace an existing output file.")
        var force = false

        func run() throws {
            let modules = try ResidualApplier.apply(base: base, residual: residual, output: out, orientation: layout, force: force)
            print("added the residual of \(modules.count) modules; wrote \(out)")
        }
    }
}
