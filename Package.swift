// swift-tools-version: 6.0
import PackageDescription

/// Every strategy plugin: a folder `Plugins/<Name>` built as `lib<Name>.so`.
/// Adding a strategy is adding its folder and one name here; nothing else in
/// the package links it, because the host finds plugins at run time.
let strategyPlugins = [
    "FedIT",
    "ZeroPad",
    "ReplicationPad",
    "FFALoRA",
    "FedExLoRA",
    "LoRAFAIR",
    "FlexLoRA",
    "FLoRA",
    "FedSALoRA",
    "SVDFedAvg",
]

/// Plugins built from `Templates/` so that `swift test` proves the templates
/// compile and pass the conformance suite.
let swiftTemplatePlugin = "SwiftPluginTemplate"
let cTemplatePlugin = "CPluginTemplate"

var targets: [Target] = [
    // The C ABI: one header, no code. Host and plugins share nothing else.
    .target(name: "CLoraAggABI"),
    // OpenBLAS (BLAS + LAPACK) through the system package.
    .systemLibrary(
        name: "COpenBLAS",
        pkgConfig: "openblas",
        providers: [.apt(["libopenblas-dev"])]
    ),
    // The Aggregator protocol, the value types of a round, and the shared math.
    .target(name: "LoraAggCore", dependencies: ["COpenBLAS"]),
    // Errors and statuses across the ABI, the same on both sides.
    .target(name: "LoraAggABIBridge", dependencies: ["LoraAggCore", "CLoraAggABI"]),
    // Turns a Swift Aggregator into the C descriptor with one export line.
    .target(name: "LoraAggPluginKit", dependencies: ["LoraAggCore", "LoraAggABIBridge"]),
    // The dlopen loader, the registry, and the wrapper making a C plugin an Aggregator.
    .target(
        name: "LoraAggHost",
        dependencies: [
            "LoraAggCore", "LoraAggABIBridge",
            .product(name: "Logging", package: "swift-log"),
        ]
    ),
    // safetensors and PEFT adapter folders.
    .target(name: "LoraAggFormats", dependencies: ["LoraAggCore"]),
    // The conformance suite every plugin must pass.
    .target(name: "LoraAggConformance", dependencies: ["LoraAggCore", "LoraAggHost"]),
    // The command-line tool.
    .executableTarget(
        name: "lora-agg",
        dependencies: [
            "LoraAggCore", "LoraAggHost", "LoraAggFormats", "LoraAggConformance",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]
    ),
    // The benchmark: one LLaMA-sized round per strategy against memcpy.
    .executableTarget(
        name: "lora-agg-bench",
        dependencies: [
            "LoraAggCore", "LoraAggHost",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]
    ),
    // Templates, built as real plugins.
    .target(
        name: swiftTemplatePlugin,
        dependencies: ["LoraAggPluginKit"],
        path: "Templates/SwiftPlugin",
        exclude: ["Package.swift.template", "README.md"]
    ),
    .target(
        name: cTemplatePlugin,
        dependencies: ["CLoraAggABI"],
        path: "Templates/CPlugin",
        exclude: ["Makefile", "README.md"],
        sources: ["plugin.c"]
    ),
    // Tests depend on the host only; they find the plugin .so files next to
    // their own executable (linking a plugin target would duplicate its entry symbol).
    .testTarget(
        name: "LoraAggTests",
        dependencies: ["LoraAggCore", "LoraAggHost", "LoraAggFormats", "LoraAggConformance", "CLoraAggABI"]
    ),
]

targets += strategyPlugins.map { name in
    .target(name: name, dependencies: ["LoraAggPluginKit"], path: "Plugins/\(name)")
}

let package = Package(
    name: "lora-agg",
    products: [
        .executable(name: "lora-agg", targets: ["lora-agg"]),
        // What a third-party Swift plugin depends on.
        .library(name: "LoraAggPluginKit", targets: ["LoraAggPluginKit"]),
        .library(name: "LoraAggHost", targets: ["LoraAggHost"]),
        .library(name: "LoraAggConformance", targets: ["LoraAggConformance"]),
        .library(name: swiftTemplatePlugin, type: .dynamic, targets: [swiftTemplatePlugin]),
        .library(name: cTemplatePlugin, type: .dynamic, targets: [cTemplatePlugin]),
    ] + strategyPlugins.map { .library(name: $0, type: .dynamic, targets: [$0]) },
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: targets
)
