/// The strategy names the package must build. `swift test` compares the set
/// of plugins found next to the test bundle with this list, so a plugin that
/// failed to build (or an unlisted one) fails the tests. Append one line per
/// new plugin.
enum ExpectedPlugins {
    static let names: [String] = [
        "fedit",
        "template-swift",
        "template-c",
        "zero-pad",
        "replication-pad",
        "ffa-lora",
        "fedex-lora",
        "lora-fair",
        "flexlora",
        "flora",
        "fedsa-lora",
        "svd-fedavg",
    ]
}
