import ArgumentParser

extension LoraAgg {
    /// `lora-agg demo`
    struct Demo: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "demo", abstract: "Run every strategy on seeded synthetic clients and compare their errors.")

        func run() throws {
            throw ValidationError("'demo' is not available in this build")
        }
    }
}
