import Foundation
import LoraAggCore
import Testing
@testable import LoraAggFormats

/// Runs the built `lora-agg` binary.
enum CLI {
    struct Outcome {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    static func run(_ arguments: [String]) throws -> Outcome {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: TestSupport.buildFolder + "/lora-agg")
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Outcome(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self), stderr: String(decoding: stderr, as: UTF8.self))
    }

    /// `lora-agg aggregate` with plugins from the build folder.
    static func aggregate(_ strategy: String, clients: [(String, Double)], out: String, _ extra: [String] = []) throws -> Outcome {
        var arguments = ["aggregate", "--strategy", strategy, "--out", out, "--plugin-path", TestSupport.buildFolder]
        for (folder, samples) in clients { arguments += ["--client", "\(folder)=\(samples)"] }
        return try run(arguments + extra)
    }
}

@Suite("lora-agg aggregate")
struct AggregateCommandTests {
    @Test("fedit writes A and B equal to the sample-weighted means, computed independently")
    func feditMeans() throws {
        var generator = TestSupport.SeededGenerator(seed: 21)
        let root = Craft.folder()
        let modules0 = AdapterFixture.randomModules(rank: 2, &generator), modules1 = AdapterFixture.randomModules(rank: 2, &generator)
        let c0 = try AdapterFixture.write(root + "/c0", config: AdapterFixture.config(), modules: modules0)
        let c1 = try AdapterFixture.write(root + "/c1", config: AdapterFixture.config(), modules: modules1)
        let outcome = try CLI.aggregate("fedit", clients: [(c0, 10), (c1, 30)], out: root + "/out")
        #expect(outcome.status == 0, "\(outcome.stderr)")
        let out = try PeftAdapter(folder: root + "/out")
        for (m0, m1) in zip(modules0, modules1) {
            let module = try #require(out.modules[m0.name])
            let a = try out.file.floats(module.a).array, b = try out.file.floats(module.b).array
            for (index, value) in a.enumerated() {
                #expect(abs(Double(value) - (0.25 * Double(m0.a.values[index]) + 0.75 * Double(m1.a.values[index]))) < 1e-6)
            }
            for (index, value) in b.enumerated() {
                #expect(abs(Double(value) - (0.25 * Double(m0.b.values[index]) + 0.75 * Double(m1.b.values[index]))) < 1e-6)
            }
            #expect(module.scaling == 2)
        }
        // The output keeps unknown config keys and records the run.
        #expect(out.config.json["some_future_key"]?.stringValue == "kept")
        #expect(out.file.metadata.contains { $0 == ("lora_agg.strategy", "fedit") })
        let report = try JSONValue.parse(String(contentsOfFile: root + "/out/report.json", encoding: .utf8))
        #expect(report["strategy"]?["name"]?.stringValue == "fedit")
        #expect(report["clients"]?.arrayValue?.compactMap { $0["weight"]?.doubleValue } == [0.25, 0.75])
        #expect(report["modules"]?.arrayValue?.count == 2)
    }

    @Test("different alphas are folded in as √(s_k/s) and the output alpha gives PEFT the scaling s")
    func mixedAlpha() throws {
        var generator = TestSupport.SeededGenerator(seed: 22)
        let root = Craft.folder()
        let m0 = AdapterFixture.randomModules(rank: 2, &generator), m1 = AdapterFixture.randomModules(rank: 2, &generator)
        // s_0 = 8/2 = 4, s_1 = 2/2 = 1, equal samples: s = 2.5.
        let c0 = try AdapterFixture.write(root + "/c0", config: AdapterFixture.config(alpha: 8), modules: m0)
        let c1 = try AdapterFixture.write(root + "/c1", config: AdapterFixture.config(alpha: 2), modules: m1)
        let outcome = try CLI.aggregate("fedit", clients: [(c0, 1), (c1, 1)], out: root + "/out", ["--dtype", "f64"])
        #expect(outcome.status == 0, "\(outcome.stderr)")
        let out = try PeftAdapter(folder: root + "/out")
        let q = try #require(out.modules[m0[0].name])
        #expect(abs(q.scaling - 2.5) < 1e-12)
        #expect(out.config.loraAlpha == 5)
        #expect(q.a.dtype == .f64)
        let a = try out.file.floats(q.a).array
        let c0Factor = (4 / 2.5).squareRoot(), c1Factor = (1 / 2.5).squareRoot()
        for (index, value) in a.enumerated() {
            #expect(abs(Double(value) - 0.5 * (c0Factor * Double(m0[0].a.values[index]) + c1Factor * Double(m1[0].a.values[index]))) < 1e-6)
        }
    }

    @Test("an existing output is refused unless --force, and --force replaces it")
    func overwrite() throws {
        var generator = TestSupport.SeededGenerator(seed: 23)
        let root = Craft.folder()
        let c0 = try AdapterFixture.write(root + "/c0", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator))
        try FileManager.default.createDirectory(atPath: root + "/out", withIntermediateDirectories: false)
        FileManager.default.createFile(atPath: root + "/out/keep.txt", contents: Data("old".utf8))
        let refused = try CLI.aggregate("fedit", clients: [(c0, 1)], out: root + "/out")
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("already exists") && refused.stderr.contains("--force"))
        #expect(FileManager.default.fileExists(atPath: root + "/out/keep.txt"))
        let forced = try CLI.aggregate("fedit", clients: [(c0, 1)], out: root + "/out", ["--force"])
        #expect(forced.status == 0, "\(forced.stderr)")
        #expect(!FileManager.default.fileExists(atPath: root + "/out/keep.txt"))
        #expect(FileManager.default.fileExists(atPath: root + "/out/adapter_model.safetensors"))
        // An input folder is never the output, even with --force.
        let onInput = try CLI.aggregate("fedit", clients: [(c0, 1)], out: c0, ["--force"])
        #expect(onInput.status != 0 && onInput.stderr.contains("input"))
        #expect(FileManager.default.fileExists(atPath: c0 + "/adapter_config.json"))
        let aboveInput = try CLI.aggregate("fedit", clients: [(c0, 1)], out: root, ["--force"])
        #expect(aboveInput.status != 0)
        #expect(FileManager.default.fileExists(atPath: c0 + "/adapter_config.json"))
    }

    @Test("a failed run leaves no output and no temporary folder")
    func noPartialOutput() throws {
        var generator = TestSupport.SeededGenerator(seed: 24)
        let root = Craft.folder()
        let c0 = try AdapterFixture.write(root + "/c0", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator))
        // Different ranks: fedit refuses during aggregation, after all reading succeeded.
        let c1 = try AdapterFixture.write(root + "/c1", config: AdapterFixture.config(r: 3), modules: AdapterFixture.randomModules(rank: 3, &generator))
        let before = try FileManager.default.contentsOfDirectory(atPath: root).sorted()
        let outcome = try CLI.aggregate("fedit", clients: [(c0, 1), (c1, 1)], out: root + "/out")
        #expect(outcome.status != 0)
        #expect(outcome.stderr.contains("equal rank"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: root).sorted() == before)
    }

    @Test("a missing module is an error naming the client and the module")
    func missingModule() throws {
        var generator = TestSupport.SeededGenerator(seed: 25)
        let root = Craft.folder()
        let modules = AdapterFixture.randomModules(rank: 2, &generator)
        let c0 = try AdapterFixture.write(root + "/c0", config: AdapterFixture.config(), modules: modules)
        let c1 = try AdapterFixture.write(root + "/lacking", config: AdapterFixture.config(), modules: [modules[0]])
        let outcome = try CLI.aggregate("fedit", clients: [(c0, 1), (c1, 1)], out: root + "/out")
        #expect(outcome.status != 0)
        #expect(outcome.stderr.contains("lacking") && outcome.stderr.contains("model.layers.0.self_attn.v_proj"))
        let partial = try CLI.aggregate("fedit", clients: [(c0, 1), (c1, 3)], out: root + "/partial", ["--allow-partial-modules"])
        #expect(partial.status == 0, "\(partial.stderr)")
        // v_proj comes from c0 alone, so it is c0's factors unchanged.
        let out = try PeftAdapter(folder: root + "/partial")
        #expect(try out.file.floats(out.modules[modules[1].name]!.a).array == modules[1].a.values)
    }

    @Test("non-LoRA tensors are averaged by samples, or taken from the first client, dropped, or refused")
    func extraTensors() throws {
        var generator = TestSupport.SeededGenerator(seed: 26)
        let root = Craft.folder()
        let head0 = TensorToWrite(name: "base_model.model.score.weight", dtype: .f32, shape: [2], floats: [1, 2])
        let head1 = TensorToWrite(name: "base_model.model.score.weight", dtype: .f32, shape: [2], floats: [5, 10])
        let c0 = try AdapterFixture.write(root + "/c0", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator), extraTensors: [head0])
        let c1 = try AdapterFixture.write(root + "/c1", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator), extraTensors: [head1])
        func head(_ policy: String) throws -> [Float]? {
            let out = root + "/out-" + policy
            let outcome = try CLI.aggregate("fedit", clients: [(c0, 1), (c1, 3)], out: out, ["--extra-tensors", policy])
            guard outcome.status == 0 else { return nil }
            let file = try SafeTensorsFile(path: out + "/adapter_model.safetensors")
            return file.info("base_model.model.score.weight") == nil ? [] : try file.floats(named: "base_model.model.score.weight").array
        }
        #expect(try head("average") == [4, 8])  // 0.25·[1,2] + 0.75·[5,10]
        #expect(try head("first") == [1, 2])
        #expect(try head("drop") == [])
        #expect(try head("error") == nil)
    }
}

/// A test strategy that returns a residual and per-client payloads, so the
/// writer's handling of both is checked without depending on other plugins.
struct ResidualAndPayloadStrategy: Aggregator {
    func aggregate(_ round: ModuleRound) throws -> AggregationResult {
        let first = round.clients[0]
        let u = Matrix(rows: round.dOut, cols: 1) { i, _ in Float(i + 1) }
        let v = Matrix(rows: 1, cols: round.dIn) { _, j in Float(j) * 0.5 }
        let payloads = round.clients.map { ClientPayload(a: $0.a.copy(), b: $0.b.copy(), scaling: $0.scaling * 2) }
        return AggregationResult(a: first.a.copy(), b: first.b.copy(), scaling: first.scaling,
                                 residual: FactoredResidual(u: u, v: v), clientPayloads: payloads,
                                 diagnostics: [Diagnostic("answer", 42)])
    }
}

@Suite("residual and per-client outputs, and apply-residual")
struct AggregateResidualTests {
    @Test("a residual is written factored, keyed by module, and per-client adapters go under clients/")
    func residualAndPayloads() throws {
        var generator = TestSupport.SeededGenerator(seed: 31)
        let root = Craft.folder()
        let c0 = try AdapterFixture.write(root + "/alice", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator))
        let c1 = try AdapterFixture.write(root + "/bob", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator))
        let summary = try AggregationJob.run(clients: [ClientSpec(folder: c0), ClientSpec(folder: c1)], aggregator: ResidualAndPayloadStrategy(),
                                             options: AggregationOptions(strategyName: "test"), output: root + "/out")
        #expect(summary.modules == 2)
        let residual = try SafeTensorsFile(path: root + "/out/residual.safetensors")
        #expect(residual.info("model.layers.0.self_attn.q_proj.U")?.shape == [6, 1])
        #expect(residual.info("model.layers.0.self_attn.q_proj.V")?.shape == [1, 4])
        let bob = try PeftAdapter(folder: root + "/out/clients/bob")
        let original = try PeftAdapter(folder: c1)
        let q = "model.layers.0.self_attn.q_proj"
        #expect(try bob.file.floats(bob.modules[q]!.a).array == original.file.floats(original.modules[q]!.a).array)
        #expect(bob.modules[q]!.scaling == 4)  // the payload's scaling, 2·2
        let report = try JSONValue.parse(String(contentsOfFile: root + "/out/report.json", encoding: .utf8))
        #expect(report["modules"]?.arrayValue?.first?["diagnostics"]?["answer"]?.doubleValue == 42)
        #expect(report["modules"]?.arrayValue?.first?["residual_rank"]?.intValue == 1)
    }

    @Test("apply-residual adds U·V to Linear weights and (U·V)ᵀ to Conv1D weights")
    func applyResidual() throws {
        let root = Craft.folder()
        // U = [1;2] (2x1), V = [3 4 5] (1x3): U·V = [[3,4,5],[6,8,10]], computed by hand.
        try SafeTensorsWriter.write([
            TensorToWrite(name: "lin.U", dtype: .f32, shape: [2, 1], floats: [1, 2]),
            TensorToWrite(name: "lin.V", dtype: .f32, shape: [1, 3], floats: [3, 4, 5]),
            TensorToWrite(name: "conv.U", dtype: .f32, shape: [2, 1], floats: [1, 2]),
            TensorToWrite(name: "conv.V", dtype: .f32, shape: [1, 3], floats: [3, 4, 5]),
        ], metadata: [("format", "lora-agg-residual")], to: root + "/residual.safetensors")
        try SafeTensorsWriter.write([
            TensorToWrite(name: "lin.weight", dtype: .f32, shape: [2, 3], floats: [1, 1, 1, 1, 1, 1]),
            TensorToWrite(name: "conv.weight", dtype: .bf16, shape: [3, 2], floats: [0, 0, 0, 0, 0, 0]),
            TensorToWrite(name: "other", dtype: .i64, shape: [1], raw: [7, 0, 0, 0, 0, 0, 0, 0]),
        ], to: root + "/base.safetensors")
        let outcome = try CLI.run(["apply-residual", "--base", root + "/base.safetensors", "--residual", root + "/residual.safetensors", "--out", root + "/merged.safetensors"])
        #expect(outcome.status == 0, "\(outcome.stderr)")
        let merged = try SafeTensorsFile(path: root + "/merged.safetensors")
        #expect(try merged.floats(named: "lin.weight").array == [4, 5, 6, 7, 9, 11])
        #expect(try merged.floats(named: "conv.weight").array == [3, 6, 4, 8, 5, 10])
        #expect(merged.info("conv.weight")?.dtype == .bf16)
        #expect(merged.rawData(merged.info("other")!) == [7, 0, 0, 0, 0, 0, 0, 0])
        let again = try CLI.run(["apply-residual", "--base", root + "/base.safetensors", "--residual", root + "/residual.safetensors", "--out", root + "/merged.safetensors"])
        #expect(again.status != 0 && again.stderr.contains("already exists"))
        // A module without a base weight is named.
        try SafeTensorsWriter.write([TensorToWrite(name: "ghost.U", dtype: .f32, shape: [1, 1], floats: [1]),
                                     TensorToWrite(name: "ghost.V", dtype: .f32, shape: [1, 1], floats: [1])], to: root + "/ghost.safetensors")
        let ghost = try CLI.run(["apply-residual", "--base", root + "/base.safetensors", "--residual", root + "/ghost.safetensors", "--out", root + "/g.safetensors"])
        #expect(ghost.status != 0 && ghost.stderr.contains("ghost.weight"))
    }
}

@Suite("apply-residual layout of square weights")
struct ApplyResidualLayoutTests {
    @Test("a square Conv1D weight follows the non-square modules even when the metadata says fan_in_fan_out false")
    func squareFollowsShapes() throws {
        let root = Craft.folder()
        // sq: U·V = [[1,2],[3,4]] (by hand), base stored [in, out] like GPT-2 attn.c_proj.
        try SafeTensorsWriter.write([
            TensorToWrite(name: "sq.U", dtype: .f32, shape: [2, 2], floats: [1, 0, 0, 1]),
            TensorToWrite(name: "sq.V", dtype: .f32, shape: [2, 2], floats: [1, 2, 3, 4]),
            TensorToWrite(name: "wide.U", dtype: .f32, shape: [3, 1], floats: [1, 1, 1]),
            TensorToWrite(name: "wide.V", dtype: .f32, shape: [1, 2], floats: [1, 1]),
        ], metadata: [("format", "lora-agg-residual"), ("fan_in_fan_out", "false")], to: root + "/residual.safetensors")
        try SafeTensorsWriter.write([
            TensorToWrite(name: "sq.weight", dtype: .f32, shape: [2, 2], floats: [0, 0, 0, 0]),
            TensorToWrite(name: "wide.weight", dtype: .f32, shape: [2, 3], floats: [0, 0, 0, 0, 0, 0]),
        ], to: root + "/base.safetensors")
        try ResidualApplier.apply(base: root + "/base.safetensors", residual: root + "/residual.safetensors", output: root + "/auto.safetensors")
        #expect(try SafeTensorsFile(path: root + "/auto.safetensors").floats(named: "sq.weight").array == [1, 3, 2, 4])
        // Forcing the Linear layout adds U·V untransposed, and refuses the [in, out] wide weight.
        #expect(throws: ResidualApplier.Failure.self) {
            try ResidualApplier.apply(base: root + "/base.safetensors", residual: root + "/residual.safetensors", output: root + "/linear.safetensors", orientation: .linear)
        }
        #expect(!FileManager.default.fileExists(atPath: root + "/linear.safetensors"))
    }
}
