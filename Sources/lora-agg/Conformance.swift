import ArgumentParser

extension LoraAgg {
    /// `lora-agg conformance`
    struct Conformance: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "conformance", abstract: "Run the conformance suite on strategies by name or on plugin files.")

        func run() throws {
            throw ValidationError("'conformance' is not available in this build")
        }
    }
}
