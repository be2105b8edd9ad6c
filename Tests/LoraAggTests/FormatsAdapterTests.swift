import Foundation
import LoraAggCore
import Testing
@testable import LoraAggFormats

/// Builders of small PEFT adapter folders.
enum AdapterFixture {
    /// A LoRA module's factors.
    struct Module {
        var name: String
        var a: Matrix
        var b: Matrix
    }

    /// A config like PEFT's, with the given extra members.
    static func config(r: Int = 2, alpha: Double = 4, extra: [(String, JSONValue)] = []) -> JSONValue {
        var json = JSONValue.object([
            ("peft_type", .string("LORA")), ("base_model_name_or_path", .string("tiny/llama")),
            ("r", .integer(r)), ("lora_alpha", .number(alpha)), ("target_modules", .array([.string("q_proj"), .string("v_proj")])),
            ("use_rslora", .bool(false)), ("fan_in_fan_out", .bool(false)), ("task_type", .string("CAUSAL_LM")),
            ("some_future_key", .string("kept")),
        ])
        for (key, value) in extra { json.set(key, value) }
        return json
    }

    /// Writes an adapter folder; `extraTensors` are written as given.
    @discardableResult
    static func write(_ folder: String, config: JSONValue, modules: [Module], dtype: DType = .f32,
                      extraTensors: [TensorToWrite] = []) throws -> String {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        var tensors = extraTensors
        for module in modules {
            tensors.append(TensorToWrite(name: "base_model.model.\(module.name).lora_A.weight", dtype: dtype, shape: [module.a.rows, module.a.cols], floats: module.a.values))
            tensors.append(TensorToWrite(name: "base_model.model.\(module.name).lora_B.weight", dtype: dtype, shape: [module.b.rows, module.b.cols], floats: module.b.values))
        }
        try AdapterWriter.write(folder: folder, config: config, tensors: tensors, metadata: [("format", "pt")])
        return folder
    }

    /// Two random modules (q 6x4 and v 3x4, so d_out differs from d_in) of the given rank.
    static func randomModules(rank: Int, _ generator: inout TestSupport.SeededGenerator) -> [Module] {
        [Module(name: "model.layers.0.self_attn.q_proj", a: TestSupport.randomMatrix(rank, 4, &generator), b: TestSupport.randomMatrix(6, rank, &generator)),
         Module(name: "model.layers.0.self_attn.v_proj", a: TestSupport.randomMatrix(rank, 4, &generator), b: TestSupport.randomMatrix(3, rank, &generator))]
    }

    /// The adapter error kind of reading `folder` (nil when it reads).
    static func errorKind(_ folder: String) -> AdapterError.Kind? {
        do { _ = try PeftAdapter(folder: folder); return nil } catch let error as AdapterError { return error.kind } catch { return nil }
    }
}

@Suite("PEFT adapter folders")
struct FormatsAdapterTests {
    @Test("modules are paired by key name, with PEFT's scaling")
    func reads() throws {
        var generator = TestSupport.SeededGenerator(seed: 1)
        let folder = try AdapterFixture.write(Craft.folder() + "/c", config: AdapterFixture.config(), modules: AdapterFixture.randomModules(rank: 2, &generator))
        let adapter = try PeftAdapter(folder: folder)
        #expect(adapter.moduleNames == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
        let v = try #require(adapter.modules["model.layers.0.self_attn.v_proj"])
        #expect(v.dOut == 3 && v.dIn == 4 && v.rank == 2 && v.scaling == 2)
    }

    @Test("adapters round-trip bit-exactly through read and write, in every dtype")
    func roundTrip() throws {
        var generator = TestSupport.SeededGenerator(seed: 2)
        for dtype in [DType.f32, .f16, .bf16] {
            let folder = try AdapterFixture.write(Craft.folder() + "/c", config: AdapterFixture.config(r: 3), modules: AdapterFixture.randomModules(rank: 3, &generator), dtype: dtype,
                                                  extraTensors: [TensorToWrite(name: "base_model.model.score.weight", dtype: .f32, shape: [2, 2], floats: [1, 2, 3, 4])])
            let adapter = try PeftAdapter(folder: folder)
            var tensors: [TensorToWrite] = []
            for tensor in adapter.file.tensors {
                tensors.append(TensorToWrite(name: tensor.name, dtype: tensor.dtype, shape: tensor.shape, floats: try adapter.file.floats(tensor).array))
            }
            let copy = Craft.folder()
            try AdapterWriter.write(folder: copy, config: adapter.config.json, tensors: tensors, metadata: adapter.file.metadata)
            let original = try Data(contentsOf: URL(fileURLWithPath: folder + "/adapter_model.safetensors"))
            let written = try Data(contentsOf: URL(fileURLWithPath: copy + "/adapter_model.safetensors"))
            #expect(original == written, "dtype \(dtype)")
            #expect(try JSONValue.parse(String(contentsOfFile: copy + "/adapter_config.json", encoding: .utf8)) == adapter.config.json)
        }
    }

    @Test("a module with only lora_A is refused, naming it")
    func unpaired() throws {
        let folder = Craft.folder()
        try AdapterWriter.write(folder: folder, config: AdapterFixture.config(), tensors: [
            TensorToWrite(name: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", dtype: .f32, shape: [2, 4], floats: .init(repeating: 1, count: 8)),
        ], metadata: [])
        let error = #expect(throws: AdapterError.self) { try PeftAdapter(folder: folder) }
        #expect(error?.kind == .unpairedModule)
        #expect(error?.message.contains("'model.layers.0.self_attn.q_proj'") == true)
    }

    @Test("DoRA, embedding LoRA and other adapter types are refused")
    func refusedTypes() throws {
        var generator = TestSupport.SeededGenerator(seed: 3)
        let modules = AdapterFixture.randomModules(rank: 2, &generator)
        let dora = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(), modules: modules,
                                            extraTensors: [TensorToWrite(name: "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", dtype: .f32, shape: [6], floats: .init(repeating: 1, count: 6))])
        #expect(AdapterFixture.errorKind(dora) == .dora)
        let doraConfig = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(extra: [("use_dora", .bool(true))]), modules: modules)
        #expect(AdapterFixture.errorKind(doraConfig) == .dora)
        let embedding = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(), modules: modules,
                                                 extraTensors: [TensorToWrite(name: "base_model.model.model.embed_tokens.lora_embedding_A", dtype: .f32, shape: [2, 5], floats: .init(repeating: 1, count: 10))])
        #expect(AdapterFixture.errorKind(embedding) == .embeddingLoRA)
        let named = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(), modules: modules,
                                             extraTensors: [TensorToWrite(name: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", dtype: .f32, shape: [2, 4], floats: .init(repeating: 1, count: 8))])
        #expect(AdapterFixture.errorKind(named) == .unrecognizedTensor)
        // A head whose name merely contains "lora_" is an ordinary extra tensor.
        let head = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(), modules: modules,
                                            extraTensors: [TensorToWrite(name: "base_model.model.flora_head.weight", dtype: .f32, shape: [1], floats: [1])])
        #expect(try PeftAdapter(folder: head).extraTensors.map(\.name) == ["base_model.model.flora_head.weight"])
        let ia3 = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(extra: [("peft_type", .string("IA3"))]), modules: modules)
        #expect(AdapterFixture.errorKind(ia3) == .unsupportedAdapterType)
    }

    @Test("a rank in the tensors that differs from r / rank_pattern is refused")
    func rankMismatch() throws {
        var generator = TestSupport.SeededGenerator(seed: 4)
        let folder = try AdapterFixture.write(Craft.folder(), config: AdapterFixture.config(r: 8), modules: AdapterFixture.randomModules(rank: 2, &generator))
        #expect(AdapterFixture.errorKind(folder) == .rankMismatch)
    }

    @Test("missing files and broken configs are refused")
    func missingAndBroken() throws {
        #expect(AdapterFixture.errorKind("/nonexistent/adapter") == .missingFile)
        let folder = Craft.folder()
        FileManager.default.createFile(atPath: folder + "/adapter_config.json", contents: Data("{".utf8))
        FileManager.default.createFile(atPath: folder + "/adapter_model.safetensors", contents: Data())
        #expect(AdapterFixture.errorKind(folder) == .invalidConfig)
    }

    @Test("rank_pattern and alpha_pattern use PEFT's suffix regex with the first key in file order winning")
    func patternOrder() throws {
        let q1 = "model.layers.1.self_attn.q_proj"
        func config(_ rankPattern: [(String, JSONValue)]) throws -> AdapterConfig {
            try AdapterConfig(json: AdapterFixture.config(r: 8, alpha: 16, extra: [
                ("rank_pattern", .object(rankPattern)), ("alpha_pattern", .object([("v_proj", .integer(4))])),
            ]), file: "x")
        }
        let broadFirst = try config([("q_proj", .integer(2)), ("layers.1.self_attn.q_proj", .integer(4))])
        #expect(broadFirst.rank(for: q1) == 2)
        let specificFirst = try config([("layers.1.self_attn.q_proj", .integer(4)), ("q_proj", .integer(2))])
        #expect(specificFirst.rank(for: q1) == 4)
        #expect(specificFirst.rank(for: "model.layers.0.self_attn.q_proj") == 2)
        // A suffix match must start at a dot: 'proj' does not match 'q_proj'.
        let partial = try config([("proj", .integer(2))])
        #expect(partial.rank(for: q1) == 8)
        #expect(specificFirst.scaling(for: "model.layers.0.self_attn.v_proj") == 4.0 / 8.0)
        let rslora = try AdapterConfig(json: AdapterFixture.config(r: 4, alpha: 6, extra: [("use_rslora", .bool(true))]), file: "x")
        #expect(rslora.scaling(for: q1) == 3)
    }

    @Test("the output config states each module's rank and alpha, and PEFT's rule reads them back")
    func outputConfig() throws {
        let modules: [(name: String, rank: Int, scaling: Double)] = [
            ("model.layers.0.self_attn.q_proj", 4, 2), ("model.layers.1.self_attn.q_proj", 4, 2),
            ("model.layers.0.self_attn.v_proj", 8, 2), ("model.layers.1.self_attn.v_proj", 4, 0.75),
        ]
        for rslora in [false, true] {
            let json = try AdapterWriter.config(from: AdapterFixture.config(), modules: modules, useRslora: rslora)
            let config = try AdapterConfig(json: json, file: "out")
            #expect(config.r == 4)
            #expect(json["some_future_key"]?.stringValue == "kept")
            for module in modules {
                #expect(config.rank(for: module.name) == module.rank)
                #expect(abs(config.scaling(for: module.name) - module.scaling) < 1e-12)
            }
            // alpha = s·R (or s·√R): 2·4 = 8 for the common modules.
            #expect(config.loraAlpha == (rslora ? 4 : 8))
        }
    }

    @Test("clients that disagree on modules, shapes or base model are refused, naming client and module")
    func agreement() throws {
        var generator = TestSupport.SeededGenerator(seed: 5)
        let root = Craft.folder()
        let modules = AdapterFixture.randomModules(rank: 2, &generator)
        let full = try PeftAdapter(folder: AdapterFixture.write(root + "/full", config: AdapterFixture.config(), modules: modules))
        let partial = try PeftAdapter(folder: AdapterFixture.write(root + "/partial", config: AdapterFixture.config(), modules: [modules[0]]))
        var error = #expect(throws: AdapterError.self) { try AggregationJob.checkAgreement([full, partial], allowPartial: false) }
        #expect(error?.kind == .missingModule)
        #expect(error?.message.contains("partial") == true && error?.message.contains("v_proj") == true)
        #expect(try AggregationJob.checkAgreement([full, partial], allowPartial: true).count == 2)

        var wide = modules
        wide[1].b = TestSupport.randomMatrix(5, 2, &generator)
        let other = try PeftAdapter(folder: AdapterFixture.write(root + "/wide", config: AdapterFixture.config(), modules: wide))
        error = #expect(throws: AdapterError.self) { try AggregationJob.checkAgreement([full, other], allowPartial: false) }
        #expect(error?.kind == .moduleShapeMismatch && error?.message.contains("wide") == true)

        let elsewhere = try PeftAdapter(folder: AdapterFixture.write(root + "/elsewhere", config: AdapterFixture.config(extra: [("base_model_name_or_path", .string("other/model"))]), modules: modules))
        error = #expect(throws: AdapterError.self) { try AggregationJob.checkAgreement([full, elsewhere], allowPartial: false) }
        #expect(error?.kind == .baseModelMismatch)
    }

    @Test("DIR=SAMPLES parsing defaults to one sample")
    func clientSpec() throws {
        #expect(try ClientSpec(parsing: "a/b=30") == ClientSpec(folder: "a/b", samples: 30))
        #expect(try ClientSpec(parsing: "a/b") == ClientSpec(folder: "a/b", samples: 1))
        #expect(try ClientSpec(parsing: "x=y") == ClientSpec(folder: "x=y", samples: 1))
        #expect(throws: AdapterError.self) { try ClientSpec(parsing: "a=-1") }
    }
}
