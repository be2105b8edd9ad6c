import ArgumentParser
import Foundation
import LoraAggConformance
import LoraAggCore
import LoraAggHost

extension LoraAgg {
    /// `lora-agg conformance`
    struct Conformance: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "conformance",
            abstract: "Run the conformance suite on strategies by name or on plugin files.",
            discussion: """
                Each check runs in a child process, so a plugin that crashes or hangs \
                yields CRASH for that check and the other checks still run. Prints PASS, \
                FAIL, SKIP (capability not declared) or CRASH per check with the measured \
                number; exits with status 1 when any check fails or crashes. See \
                docs/conformance.md for every check and its tolerance.
                """)

        @Argument(help: ArgumentHelp("Strategy names or plugin files (lib*.so); every loaded plugin when omitted.",
                                     valueName: "name-or-path"))
        var targets: [String] = []

        @OptionGroup var plugins: PluginOptions

        @Flag(help: "Print the report as JSON.")
        var json = false

        @Option(name: .customLong("check"), help: ArgumentHelp("Run only this check (repeatable); see --list-checks.", valueName: "id"))
        var checks: [String] = []

        @Flag(help: "List the checks with their expectations and exit.")
        var listChecks = false

        @Flag(help: "Run the checks in this process: faster, but a crashing plugin ends the run.")
        var inProcess = false

        @Option(help: ArgumentHelp("Seconds a check may run without progress before it counts as crashed.", valueName: "seconds"))
        var timeout: Double = 120

        /// Set when this process is the child of an isolated run: write records to this file.
        @Option(name: .customLong("child"), help: .hidden)
        var childOutput: String?

        func validate() throws {
            let known = ConformanceSuite.checkIDs
            for id in checks where !known.contains(id) {
                var message = "unrecognized check '\(id)'; known: \(known.joined(separator: ", "))"
                if let near = closestName(to: id, among: known) { message += " (did you mean '\(near)'?)" }
                throw ValidationError(message)
            }
            if childOutput != nil && targets.count != 1 {
                throw ValidationError("--child needs exactly one plugin file")
            }
            if !(timeout > 0) { throw ValidationError("invalid value '\(timeout)' for '--timeout': expected seconds > 0") }
        }

        func run() throws {
            if let childOutput {
                try ConformanceChild.run(pluginPath: targets[0], checks: checks, output: childOutput)
                return
            }
            if listChecks {
                for check in ConformanceSuite.checks {
                    print(check.id)
                    print(wrap(check.expectation, width: 88, indent: "    "))
                }
                return
            }
            var reports: [PluginReport] = []
            for target in try resolveTargets() {
                switch target {
                case .file(let path):
                    reports.append(inProcess ? ConformanceSuite.run(pluginAt: path, only: checks)
                                             : IsolatedRunner(timeout: timeout).run(pluginPath: path, only: checks))
                case .unloadable(let path, let detail):
                    reports.append(ConformanceSuite.loadFailure(path: path, detail: detail, only: checks))
                }
                if !json { print(render(reports.last!)) }
            }
            if json {
                print(renderJSON(reports))
            } else if reports.count > 1 {
                let failed = reports.filter { !$0.passed }.map(\.name)
                print(failed.isEmpty ? "All \(reports.count) plugins passed."
                                     : "\(failed.count) of \(reports.count) plugins failed: \(failed.joined(separator: ", ")).")
            }
            if reports.contains(where: { !$0.passed }) { throw ExitCode(1) }
        }

        enum Target {
            case file(String)
            case unloadable(path: String, detail: String)
        }

        /// Plugin files from the arguments: paths stay paths (loaded only in
        /// the child, so a plugin crashing at load cannot end this process),
        /// names are looked up in the registry.
        func resolveTargets() throws -> [Target] {
            let isPath = { (text: String) in text.contains("/") || text.hasSuffix(".so") }
            var found: [Target] = []
            var registry: PluginRegistry?
            func loadedRegistry() throws -> PluginRegistry {
                if let registry { return registry }
                let loaded = try plugins.registry()
                registry = loaded
                return loaded
            }
            if targets.isEmpty {
                let all = try loadedRegistry()
                found = all.names.map { .file(all.plugins[$0]!.path) }
                found += all.skipped.map { .unloadable(path: $0.path, detail: $0.error.description.split(separator: "\n").joined(separator: " ")) }
                return found
            }
            for target in targets {
                if isPath(target) {
                    guard FileManager.default.fileExists(atPath: target) else { throw LoaderError.pathMissing(path: target) }
                    found.append(.file(target))
                } else {
                    found.append(.file(try loadedRegistry().plugin(named: target).path))
                }
            }
            return found
        }

        /// The plain-text report of one plugin.
        func render(_ report: PluginReport) -> String {
            var lines = ["\(report.name) \(report.version)  \(report.path)"]
            let width = (report.results.map(\.id.count).max() ?? 0)
            let measuredWidth = report.results.map(\.measuredText.count).max() ?? 0
            for result in report.results {
                var line = "  " + result.outcome.label.padding(toLength: 6, withPad: " ", startingAt: 0)
                    + result.id.padding(toLength: width + 2, withPad: " ", startingAt: 0)
                    + result.measuredText.padding(toLength: measuredWidth, withPad: " ", startingAt: 0)
                switch result.outcome {
                case .pass, .skip:
                    if !result.detail.isEmpty {
                        line += "  " + (result.detail.count > 110 ? result.detail.prefix(109) + "…" : result.detail)
                    }
                    lines.append(line)
                case .fail, .crashed:
                    lines.append(line)
                    lines.append(wrap(result.detail, width: 100, indent: String(repeating: " ", count: 8)))
                }
            }
            lines.append("  \(report.count(.pass)) passed, \(report.count(.fail)) failed, \(report.count(.skip)) skipped, \(report.count(.crashed)) crashed")
            return lines.map { $0.replacingOccurrences(of: "\\s+$", with: "", options: .regularExpression) }.joined(separator: "\n") + "\n"
        }

        /// The JSON report: `{"version":1,"kind":"conformance-report","passed":…,"plugins":[…]}`.
        func renderJSON(_ reports: [PluginReport]) -> String {
            struct Document: Encodable {
                var version = 1
                var kind = "conformance-report"
                var tolerance = Tolerance.relative
                var passed: Bool
                var plugins: [PluginReport]
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            // JSON has no infinity; a measured error can be one.
            encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            let data = (try? encoder.encode(Document(passed: reports.allSatisfy(\.passed), plugins: reports))) ?? Data()
            return String(decoding: data, as: UTF8.self)
        }
    }
}
