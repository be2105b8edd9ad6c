import ArgumentParser

extension LoraAgg {
    /// `lora-agg apply-residual`
    struct ApplyResidual: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "apply-residual", abstract: "Add a strategy's factored base-weight residual to a base checkpoint.")

        func run() throws {
            throw ValidationError("'apply-residual' is not available in this build")
        }
    }
}
