import Foundation
import Testing

@Suite("lora-agg new-plugin")
struct NewPluginTests {
    @Test("a C plugin with a dashed name scaffolds, builds with make, and passes conformance through the CLI")
    func cPlugin() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let scaffold = try ConformanceTools.loraAgg(["new-plugin", "my-rule", "--language", "c", "--output", folder + "/my-rule"])
        #expect(scaffold.status == 0, "\(scaffold.stderr)")
        #expect(scaffold.stdout.contains("make"))
        let source = try String(contentsOfFile: folder + "/my-rule/plugin.c", encoding: .utf8)
        #expect(source.contains(".name = \"my-rule\""))
        #expect(!source.contains("template-c"))
        let make = try ConformanceTools.run("/usr/bin/env", ["make", "-C", folder + "/my-rule"])
        #expect(make.status == 0, "\(make.stdout)\(make.stderr)")
        let conformance = try ConformanceTools.loraAgg(["conformance", folder + "/my-rule/libMyRule.so"])
        #expect(conformance.status == 0, "\(conformance.stdout)")
        #expect(conformance.stdout.hasPrefix("my-rule 0.1.0"))
        #expect(conformance.stdout.contains("0 failed"))
    }

    /// Builds the scaffolded package against this checkout by path, with its
    /// own scratch folder: about 15–40 s, most of it compiling LoraAggCore.
    @Test("a Swift plugin with a dashed name scaffolds, builds with swift build, and passes conformance through the CLI")
    func swiftPlugin() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let package = folder + "/my-swift-rule"
        let scaffold = try ConformanceTools.loraAgg(["new-plugin", "my-swift-rule", "--output", package])
        #expect(scaffold.status == 0, "\(scaffold.stderr)")
        let source = try String(contentsOfFile: package + "/Sources/Plugin.swift", encoding: .utf8)
        #expect(source.contains("name: \"my-swift-rule\""))
        #expect(source.contains("struct MySwiftRule: Strategy"))
        let manifest = try String(contentsOfFile: package + "/Package.swift", encoding: .utf8)
        #expect(manifest.contains(".package(path: \"\(ConformanceTools.checkout.path)\")"))
        #expect(!manifest.contains("__"))
        let swift = try ConformanceTools.run("/usr/bin/env", ["swift", "build", "--package-path", package,
                                                             "--scratch-path", folder + "/scratch"])
        #expect(swift.status == 0, "\(swift.stdout)\(swift.stderr)")
        let library = folder + "/scratch/debug/libMySwiftRule.so"
        let conformance = try ConformanceTools.loraAgg(["conformance", library])
        #expect(conformance.status == 0, "\(conformance.stdout)")
        #expect(conformance.stdout.hasPrefix("my-swift-rule 0.1.0"))
        #expect(conformance.stdout.contains("0 failed"))
    }

    @Test("a name that is not kebab-case is refused with a usage error naming it")
    func badName() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        for name in ["My_Rule", "my--rule", "rule-", "2rule", "my rule"] {
            let output = try ConformanceTools.loraAgg(["new-plugin", name, "--output", folder + "/x"])
            #expect(output.status == 64, "\(name)")
            #expect(output.stderr.contains("invalid plugin name '\(name)': expected kebab-case"), "\(name): \(output.stderr)")
        }
        #expect(!FileManager.default.fileExists(atPath: folder + "/x"))
    }

    @Test("an existing output folder is refused and left untouched")
    func existingOutput() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        try "keep".write(toFile: folder + "/marker", atomically: true, encoding: .utf8)
        let output = try ConformanceTools.loraAgg(["new-plugin", "my-rule", "--language", "c", "--output", folder])
        #expect(output.status == 1)
        #expect(output.stderr.contains("Could not create plugin folder '\(folder)': it already exists"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder) == ["marker"])
    }

    @Test("--lora-agg-path must be a checkout with Templates/, and the error says so")
    func badCheckout() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let output = try ConformanceTools.loraAgg(["new-plugin", "my-rule", "--lora-agg-path", folder, "--output", folder + "/out"])
        #expect(output.status == 1)
        #expect(output.stderr.contains("Could not use '\(folder)' as the lora-agg checkout"))
        #expect(output.stderr.contains("Templates/SwiftPlugin"))
        #expect(!FileManager.default.fileExists(atPath: folder + "/out"))
    }

    @Test("without --output the plugin goes into ./NAME, and the next steps name the library")
    func defaultOutput() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let output = try ConformanceTools.loraAgg(["new-plugin", "fed-2x", "--language", "c"], in: folder)
        #expect(output.status == 0, "\(output.stderr)")
        #expect(FileManager.default.fileExists(atPath: folder + "/fed-2x/plugin.c"))
        #expect(output.stdout.contains("libFed2x.so"))
        let makefile = try String(contentsOfFile: folder + "/fed-2x/Makefile", encoding: .utf8)
        #expect(makefile.contains("libFed2x.so"))
        #expect(makefile.contains(ConformanceTools.checkout.path + "/Sources/CLoraAggABI/include"))
    }
}
