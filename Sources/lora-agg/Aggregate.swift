import ArgumentParser

extension LoraAgg {
    /// `lora-agg aggregate`
    struct Aggregate: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "aggregate", abstract: "Aggregate client adapters with a strategy and write a PEFT adapter.")

        func run() throws {
            throw ValidationError("'aggregate' is not available in this build")
        }
    }
}
