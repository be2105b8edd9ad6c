import Foundation
import Testing
import LoraAggConformance
import LoraAggCore
import LoraAggHost

@Suite("conformance suite over the package's plugins")
struct ConformanceTests {
    @Test("the package builds exactly the expected plugins, and every one loads")
    func expectedPluginsAreBuilt() {
        let registry = TestSupport.registry
        #expect(Set(registry.names) == Set(ExpectedPlugins.names),
                "missing: \(Set(ExpectedPlugins.names).subtracting(registry.names).sorted()), unexpected: \(Set(registry.names).subtracting(ExpectedPlugins.names).sorted())")
        #expect(registry.skipped.isEmpty, "plugins that failed to load: \(registry.skipped.map(\.path))")
    }

    @Test("every built plugin passes every conformance check", arguments: ExpectedPlugins.names)
    func pluginPasses(name: String) throws {
        let plugin = try TestSupport.registry.plugin(named: name)
        let report = ConformanceSuite.run(on: ConformanceSubject(plugin: plugin))
        #expect(report.results.map(\.id) == ConformanceSuite.checkIDs)
        for result in report.results {
            #expect(result.outcome == .pass || result.outcome == .skip,
                    "\(name): \(result.id) \(result.outcome.label) \(result.measuredText) \(result.detail)")
        }
    }

    @Test("check IDs are unique kebab-case, expectations are one sentence, and docs/conformance.md describes each")
    func checkTable() throws {
        let ids = ConformanceSuite.checkIDs
        #expect(Set(ids).count == ids.count)
        let docs = try String(contentsOf: ConformanceTools.checkout.appendingPathComponent("docs/conformance.md"), encoding: .utf8)
        for check in ConformanceSuite.checks {
            #expect(StrategyInfo.isKebabCase(check.id), "\(check.id)")
            #expect(check.expectation.hasSuffix("."), "\(check.id)")
            #expect(docs.contains("`\(check.id)`"), "docs/conformance.md does not describe '\(check.id)'")
        }
    }

    @Test("a non-exact plugin's exact-update check is skipped and reports FedIT's bias, computed independently")
    func exactSkipReportsBias() throws {
        let plugin = try TestSupport.registry.plugin(named: "fedit")
        let report = ConformanceSuite.run(on: ConformanceSubject(plugin: plugin), only: ["exact-update"])
        let result = try #require(report.results.first)
        #expect(result.outcome == .skip)
        // Averaging unaligned random factors loses most of the update; the
        // bias is far above round-off (a bias near zero would mean the check
        // compared the wrong things).
        #expect((result.measured ?? 0) > 0.1)
    }

    @Test("lora-agg conformance prints PASS or SKIP for every check and exits 0 for good plugins")
    func cliPasses() throws {
        let output = try ConformanceTools.loraAgg(["conformance", "fedit", "template-c"])
        #expect(output.status == 0, "\(output.stdout)\(output.stderr)")
        for id in ConformanceSuite.checkIDs {
            #expect(output.stdout.contains("PASS  \(id)") || output.stdout.contains("SKIP  \(id)"), "\(id)")
        }
        let line = output.stdout.split(separator: "\n").first { $0.contains("single-client-unchanged") } ?? ""
        #expect(line.contains("relative error"), "the measured number is printed: \(line)")
        #expect(output.stdout.contains("All 2 plugins passed."))
    }

    @Test("lora-agg conformance --json reports every check of every plugin with a version and kind")
    func cliJSON() throws {
        let output = try ConformanceTools.loraAgg(["conformance", "--json", "template-swift"])
        #expect(output.status == 0, "\(output.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any])
        #expect(object["version"] as? Int == 1)
        #expect(object["kind"] as? String == "conformance-report")
        #expect(object["passed"] as? Bool == true)
        let report = try ConformanceTools.decodeReport(output.stdout)
        #expect(Set(report["template-swift"]?.keys.map { $0 } ?? []) == Set(ConformanceSuite.checkIDs))
    }

    @Test("an unrecognized check or strategy is a clear error")
    func cliErrors() throws {
        let check = try ConformanceTools.loraAgg(["conformance", "--check", "determinstic", "fedit"])
        #expect(check.status == 64)
        #expect(check.stderr.contains("unrecognized check 'determinstic'"))
        #expect(check.stderr.contains("did you mean 'deterministic'?"))
        let strategy = try ConformanceTools.loraAgg(["conformance", "fedt"])
        #expect(strategy.status == 1)
        #expect(strategy.stderr.contains("Unrecognized strategy 'fedt'"))
        let missing = try ConformanceTools.loraAgg(["conformance", "/nonexistent/libX.so"])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("Could not find plugin path '/nonexistent/libX.so'"))
    }
}
