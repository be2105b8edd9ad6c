import Foundation
import LoraAggCore
import LoraAggHost

/// Shared helpers for the test suites.
enum TestSupport {
    /// The folder of the test bundle, where `swift build` / `swift test` put the plugins.
    static var buildFolder: String { PluginLoader.executableFolder ?? ".build/debug" }

    /// Every plugin the package builds, loaded from the build folder.
    static let registry: PluginRegistry = {
        do { return try PluginRegistry(paths: [buildFolder]) } catch { fatalError("\(error)") }
    }()

    /// A deterministic pseudo-random generator (SplitMix64), so tests never depend on the system RNG.
    typealias SeededGenerator = Synthetic.Generator

    /// A matrix of uniform values in [-1, 1).
    static func randomMatrix(_ rows: Int, _ cols: Int, _ generator: inout SeededGenerator) -> Matrix {
        Matrix(rows: rows, cols: cols, values: (0..<(rows * cols)).map { _ in Float.random(in: -1..<1, using: &generator) })
    }

    /// A client with random factors.
    static func randomClient(_ id: String, rank: Int, dOut: Int, dIn: Int, samples: Double = 10,
                             scaling: Double = 2, _ generator: inout SeededGenerator) -> ClientUpdate {
        ClientUpdate(id: id, samples: samples, scaling: scaling,
                     a: randomMatrix(rank, dIn, &generator), b: randomMatrix(dOut, rank, &generator))
    }
}
