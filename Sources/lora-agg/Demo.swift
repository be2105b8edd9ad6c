import ArgumentParser
import Dispatch
import Foundation
import LoraAggCore
import LoraAggFormats
import LoraAggHost

extension LoraAgg {
    /// `lora-agg demo`: the built-in default job.
    struct Demo: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run every strategy on seeded synthetic clients and compare their errors.",
            discussion: """
                Makes non-IID clients (a shared direction plus a client-specific one) for three \
                non-square modules, once with equal ranks and once with ranks 2 to 16 (α = 16, so \
                scalings differ), aggregates them with every loaded strategy, and reports the \
                relative error of the effective update against the exact Σ p_k s_k B_k A_k, for the \
                global adapter and for what each client receives.
                """)

        @Option(help: "Seed of the synthetic clients.")
        var seed: UInt64 = 42

        @Option(help: "How different the clients are: 0 identical, 1 client part as large as the shared part.")
        var heterogeneity: Float = 0.8

        @Option(help: ArgumentHelp("Also write the comparison as an SVG bar chart to this file.", valueName: "file.svg"))
        var plot: String?

        @Option(help: ArgumentHelp("Also write the mixed-rank clients as PEFT adapter folders here, to try `lora-agg aggregate` on.", valueName: "dir"))
        var writeClients: String?

        @Flag(help: "Also run the template plugins.")
        var includeTemplates = false

        @OptionGroup var plugins: PluginOptions

        func validate() throws {
            guard heterogeneity >= 0, heterogeneity.isFinite else {
                throw ValidationError("invalid heterogeneity '\(heterogeneity)': expected a number >= 0")
            }
        }

        func run() throws {
            let registry = try plugins.registry()
            let scenarios = DemoScenario.standard(seed: seed, heterogeneity: heterogeneity)
            var chart: [(scenario: String, rows: [DemoRow])] = []
            for scenario in scenarios {
                print("\n\(scenario.title)")
                let names = registry.names.filter { includeTemplates || !$0.hasPrefix("template-") }
                let rows = names.map { name in scenario.run(try? registry.plugin(named: name)) }
                print(table(header: ["STRATEGY", "GLOBAL ERR", "CLIENT ERR", "TIME", "NOTE"],
                            rows: rows.map { $0.cells }))
                chart.append((scenario.title, rows))
            }
            print("""

                GLOBAL ERR: ‖effective − exact‖/‖exact‖ of the global adapter (s·B·A plus any base residual).
                CLIENT ERR: the same for the update each client starts the next round with, averaged over clients.
                Exact strategies sit at the Float32 floor (~1e-7); FedIT's gap is the aggregation bias.
                """)
            if let writeClients, let mixed = scenarios.last {
                try mixed.writeAdapters(to: writeClients)
                print("Wrote \(mixed.modules.first?.clients.count ?? 0) PEFT adapters to \(writeClients)/client-*")
            }
            if let plot {
                try DemoPlot.svg(chart).write(toFile: plot, atomically: true, encoding: .utf8)
                print("Wrote \(plot)")
            }
        }
    }
}

/// One synthetic job of the demo.
struct DemoScenario {
    let title: String
    let modules: [(name: String, dOut: Int, dIn: Int, clients: [ClientUpdate])]

    static func standard(seed: UInt64, heterogeneity: Float) -> [DemoScenario] {
        let shapes = [("q_proj", 96, 64), ("up_proj", 160, 64), ("down_proj", 64, 160)]
        func scenario(_ title: String, ranks: [Int], seedOffset: UInt64) -> DemoScenario {
            DemoScenario(title: title, modules: shapes.enumerated().map { index, shape in
                (shape.0, shape.1, shape.2,
                 Synthetic.clients(seed: seed &+ seedOffset &+ UInt64(index), dOut: shape.1, dIn: shape.2,
                                   ranks: ranks, heterogeneity: heterogeneity))
            })
        }
        return [
            scenario("Equal ranks: 6 non-IID clients, r = 8, α = 16, modules 96x64, 160x64, 64x160",
                     ranks: Array(repeating: 8, count: 6), seedOffset: 0),
            scenario("Mixed ranks: 6 non-IID clients, r = 2, 4, 4, 8, 16, 16, α = 16 (s = α/r differs)",
                     ranks: [2, 4, 4, 8, 16, 16], seedOffset: 100),
        ]
    }

    /// Writes each client as a PEFT adapter folder `dir/client-<k>`: one module
    /// per demo module under a Llama-style path, its rank in `rank_pattern`
    /// where it differs, α = 16 as in the demo.
    func writeAdapters(to folder: String) throws {
        guard let count = modules.first?.clients.count else { return }
        if FileManager.default.fileExists(atPath: folder) {
            throw ValidationError("output folder '\(folder)' already exists; choose a new one")
        }
        let paths = ["q_proj": "model.layers.0.self_attn.q_proj", "up_proj": "model.layers.0.mlp.up_proj",
                     "down_proj": "model.layers.0.mlp.down_proj"]
        for k in 0..<count {
            let clientFolder = folder + "/client-\(k)"
            try FileManager.default.createDirectory(atPath: clientFolder, withIntermediateDirectories: true)
            var tensors: [TensorToWrite] = []
            for module in modules {
                let client = module.clients[k], path = paths[module.name] ?? module.name
                tensors.append(TensorToWrite(name: "base_model.model.\(path).lora_A.weight", dtype: .f32,
                                             shape: [client.a.rows, client.a.cols], floats: client.a.values))
                tensors.append(TensorToWrite(name: "base_model.model.\(path).lora_B.weight", dtype: .f32,
                                             shape: [client.b.rows, client.b.cols], floats: client.b.values))
            }
            let rank = modules[0].clients[k].rank
            let config: JSONValue = .object([
                ("peft_type", .string("LORA")), ("task_type", .string("CAUSAL_LM")),
                ("base_model_name_or_path", .string("lora-agg/demo-tiny-llama")),
                ("r", .integer(rank)), ("lora_alpha", .integer(16)), ("use_rslora", .bool(false)),
                ("target_modules", .array(["q_proj", "up_proj", "down_proj"].map { .string($0) })),
                ("rank_pattern", .object([])), ("alpha_pattern", .object([])),
                ("fan_in_fan_out", .bool(false)), ("bias", .string("none")), ("modules_to_save", .null),
            ])
            try AdapterWriter.write(folder: clientFolder, config: config, tensors: tensors,
                                    metadata: [("format", "pt"), ("lora_agg.demo_client", "\(k)")])
        }
    }

    /// Aggregates every module with one strategy and measures the errors.
    func run(_ plugin: LoadedPlugin?) -> DemoRow {
        guard let plugin else { return DemoRow(name: "?", note: "could not load") }
        var row = DemoRow(name: plugin.info.name)
        do {
            let aggregator = try plugin.makeAggregator()
            var global: [Double] = [], perClient: [Double] = []
            var seconds = 0.0
            for module in modules {
                var clients = module.clients
                if plugin.info.capabilities.contains(.requiresSharedA), Set(clients.map(\.rank)).count == 1 {
                    // FFA-LoRA's clients train B only, on an A frozen at the same seed.
                    for k in clients.indices { clients[k].a = clients[0].a }
                    row.note = "shared A"
                }
                try ModuleRound.withRound(module: module.name, dOut: module.dOut, dIn: module.dIn, clients: clients) { round in
                    let start = DispatchTime.now().uptimeNanoseconds
                    let result = try aggregator.aggregate(round)
                    seconds += Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    let ideal = Reference.idealUpdate(round)
                    global.append(Reference.relativeError(Reference.effectiveUpdate(result, dOut: round.dOut, dIn: round.dIn), ideal))
                    // A global adapter wider than every client with no payloads (FLoRA's
                    // stack) is merged into the base by every client, as the Python Flower
                    // strategy does; otherwise client k keeps its payload or its first r_k slots.
                    let mergedByClients = result.clientPayloads == nil && result.rank > round.maxRank
                    if mergedByClients { row.note = "clients merge the global adapter" }
                    for (k, client) in round.clients.enumerated() {
                        if mergedByClients {
                            perClient.append(global.last!)
                            continue
                        }
                        let received = Reference.receivedUpdate(result, client: k, rank: client.rank, dOut: round.dOut, dIn: round.dIn)
                        perClient.append(Reference.relativeError(received, ideal))
                    }
                }
            }
            row.globalError = global.reduce(0, +) / Double(global.count)
            row.clientError = perClient.reduce(0, +) / Double(perClient.count)
            row.seconds = seconds
            if plugin.info.capabilities.contains(.exact) { row.note += (row.note.isEmpty ? "" : ", ") + "exact" }
            if plugin.info.capabilities.contains(.perClientPayloads) { row.note += (row.note.isEmpty ? "" : ", ") + "per-client" }
        } catch let error as AggregationError {
            if case .unsupported = error { row.note = "refused: equal ranks only" } else { row.note = "error: \(error.message)" }
        } catch {
            row.note = "error: \(error)"
        }
        return row
    }
}

/// One strategy's line in the demo table.
struct DemoRow {
    var name: String
    var globalError: Double?
    var clientError: Double?
    var seconds: Double?
    var note = ""

    init(name: String, note: String = "") {
        self.name = name
        self.note = note
    }

    var cells: [String] {
        [name,
         globalError.map { String(format: "%.2e", $0) } ?? "-",
         clientError.map { String(format: "%.2e", $0) } ?? "-",
         seconds.map { String(format: "%.1f ms", $0 * 1000) } ?? "-",
         note]
    }
}

/// A dependency-free SVG bar chart of the demo's global errors (log scale).
enum DemoPlot {
    static func svg(_ chart: [(scenario: String, rows: [DemoRow])]) -> String {
        let names = chart.first?.rows.map(\.name) ?? []
        let barHeight = 14.0, groupGap = 10.0, left = 150.0, width = 520.0
        let colors = ["#4878d0", "#ee854a", "#6acc64"]
        let floor = -9.0, ceiling = 1.0
        func x(_ error: Double) -> Double {
            let exponent = min(max(log10(max(error, 1e-12)), floor), ceiling)
            return (exponent - floor) / (ceiling - floor) * width
        }
        let groupHeight = Double(chart.count) * barHeight + groupGap
        let height = 60 + Double(names.count) * groupHeight + 40
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(left + width + 40))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <text x="10" y="20" font-size="14">Relative error of the global update against Σ p_k s_k B_k A_k (log scale)</text>

            """
        for (index, entry) in chart.enumerated() {
            svg += "<rect x=\"\(Int(left) + 260 * index)\" y=\"30\" width=\"10\" height=\"10\" fill=\"\(colors[index % colors.count])\"/>"
            svg += "<text x=\"\(Int(left) + 14 + 260 * index)\" y=\"39\">\(entry.scenario.split(separator: ":").first ?? "")</text>\n"
        }
        for exponent in stride(from: Int(floor), through: Int(ceiling), by: 2) {
            let gx = left + x(pow(10, Double(exponent)))
            svg += "<line x1=\"\(gx)\" y1=\"50\" x2=\"\(gx)\" y2=\"\(height - 30)\" stroke=\"#ddd\"/>"
            svg += "<text x=\"\(gx - 12)\" y=\"\(height - 14)\">1e\(exponent)</text>\n"
        }
        for (n, name) in names.enumerated() {
            let top = 55 + Double(n) * groupHeight
            svg += "<text x=\"10\" y=\"\(top + barHeight)\">\(name)</text>\n"
            for (index, entry) in chart.enumerated() {
                let y = top + Double(index) * barHeight
                if let error = entry.rows[n].globalError {
                    svg += "<rect x=\"\(left)\" y=\"\(y)\" width=\"\(max(1, x(error)))\" height=\"\(barHeight - 2)\" fill=\"\(colors[index % colors.count])\"/>"
                    svg += "<text x=\"\(left + x(error) + 4)\" y=\"\(y + barHeight - 4)\" font-size=\"10\">\(String(format: "%.1e", error))</text>\n"
                } else {
                    svg += "<text x=\"\(left + 4)\" y=\"\(y + barHeight - 4)\" font-size=\"10\" fill=\"#888\">\(entry.rows[n].note)</text>\n"
                }
            }
        }
        return svg + "</svg>\n"
    }
}
