import ArgumentParser

extension LoraAgg {
    /// `lora-agg new-plugin`
    struct NewPlugin: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "new-plugin", abstract: "Create a new strategy plugin from a template.")

        func run() throws {
            throw ValidationError("'new-plugin' is not available in this build")
        }
    }
}
