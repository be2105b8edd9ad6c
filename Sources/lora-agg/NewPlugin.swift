import ArgumentParser
import Foundation
import LoraAggCore

extension LoraAgg {
    /// `lora-agg new-plugin`
    struct NewPlugin: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "new-plugin",
            abstract: "Create a new strategy plugin from a template.",
            discussion: """
                Copies Templates/SwiftPlugin (a Swift package depending on this checkout \
                by path) or Templates/CPlugin (plugin.c and a Makefile) into the output \
                folder and renames the strategy. The templates are found by walking up \
                from this executable to the checkout holding Package.swift and Templates/; \
                use --lora-agg-path when the executable lives elsewhere.
                """)

        enum Language: String, ExpressibleByArgument, CaseIterable {
            case swift, c
        }

        @Argument(help: "The strategy name, in kebab-case (e.g. my-rule).")
        var name: String

        @Option(help: "The language of the plugin.")
        var language: Language = .swift

        @Option(help: ArgumentHelp("The folder to create (default: ./NAME); must not exist.", valueName: "dir"))
        var output: String?

        @Option(name: .customLong("lora-agg-path"),
                help: ArgumentHelp("The lora-agg checkout holding Package.swift and Templates/.", valueName: "dir"))
        var loraAggPath: String?

        func validate() throws {
            guard StrategyInfo.isKebabCase(name) else {
                throw ValidationError("invalid plugin name '\(name)': expected kebab-case, lowercase letters and digits joined by single dashes, starting with a letter (e.g. 'my-rule')")
            }
        }

        func run() throws {
            let checkout = try Self.locateCheckout(override: loraAggPath)
            let product = Self.upperCamelCase(name)
            let destination = URL(fileURLWithPath: output ?? name).standardizedFileURL
            guard !FileManager.default.fileExists(atPath: destination.path) else {
                throw NewPluginError.outputExists(path: destination.path)
            }
            let files = try scaffold(checkout: checkout, product: product)
            try writeAtomically(files, to: destination)
            printNextSteps(destination: destination, product: product)
        }

        /// The scaffold's files: relative path → contents.
        func scaffold(checkout: URL, product: String) throws -> [(String, String)] {
            func template(_ path: String) throws -> String {
                let url = checkout.appendingPathComponent("Templates").appendingPathComponent(path)
                do {
                    return try String(contentsOf: url, encoding: .utf8)
                } catch {
                    throw NewPluginError.templateMissing(path: url.path)
                }
            }
            switch language {
            case .swift:
                let manifest = try template("SwiftPlugin/Package.swift.template")
                    .replacingOccurrences(of: "__PRODUCT__", with: product)
                    .replacingOccurrences(of: "__LORA_AGG_PATH__", with: checkout.path)
                    // A path dependency's identity is its folder name, lowercased.
                    .replacingOccurrences(of: "__LORA_AGG_PACKAGE__", with: checkout.lastPathComponent.lowercased())
                let source = try template("SwiftPlugin/Plugin.swift")
                    .replacingOccurrences(of: "TemplateSwift", with: product)
                    .replacingOccurrences(of: "template-swift", with: name)
                return [("Package.swift", manifest), ("Sources/Plugin.swift", source), (".gitignore", ".build/\nPackage.resolved\n")]
            case .c:
                let include = checkout.appendingPathComponent("Sources/CLoraAggABI/include").path
                let makefile = try template("CPlugin/Makefile")
                    .replacingOccurrences(of: "__PRODUCT__", with: product)
                    .replacingOccurrences(of: "__LORA_AGG_INCLUDE__", with: include)
                let source = try template("CPlugin/plugin.c")
                    .replacingOccurrences(of: "template-c", with: name)
                return [("Makefile", makefile), ("plugin.c", source), (".gitignore", "*.so\n")]
            }
        }

        /// Writes into a temporary sibling folder, then renames it: a failure leaves no output.
        func writeAtomically(_ files: [(String, String)], to destination: URL) throws {
            let parent = destination.deletingLastPathComponent()
            let staging = parent.appendingPathComponent(".\(destination.lastPathComponent).partial-\(UUID().uuidString.prefix(8))")
            do {
                try FileManager.default.createDirectory(at: parent, withIntermediateDirectories: true)
                for (path, contents) in files {
                    let url = staging.appendingPathComponent(path)
                    try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
                    try contents.write(to: url, atomically: false, encoding: .utf8)
                }
                try FileManager.default.moveItem(at: staging, to: destination)
            } catch {
                try? FileManager.default.removeItem(at: staging)
                throw NewPluginError.couldNotWrite(path: destination.path, reason: error.localizedDescription)
            }
        }

        func printNextSteps(destination: URL, product: String) {
            let folder = destination.path
            switch language {
            case .swift:
                print("""
                    Created Swift plugin '\(name)' in '\(folder)': Package.swift, Sources/Plugin.swift.

                    Next steps:
                      cd \(folder)
                      swift build                # builds .build/debug/lib\(product).so
                      lora-agg conformance .build/debug/lib\(product).so
                      lora-agg aggregate --plugin-path .build/debug --strategy \(name) --client DIR=SAMPLES ... --out OUT
                    Edit `aggregate` in Sources/Plugin.swift, declare only capabilities you
                    honour, and rerun conformance. See docs/writing-a-plugin.md.
                    """)
            case .c:
                print("""
                    Created C plugin '\(name)' in '\(folder)': plugin.c, Makefile.

                    Next steps:
                      cd \(folder)
                      make                       # builds lib\(product).so
                      lora-agg conformance ./lib\(product).so
                      lora-agg aggregate --plugin-path . --strategy \(name) --client DIR=SAMPLES ... --out OUT
                    Edit `aggregate` in plugin.c, declare only capabilities you honour, and
                    rerun conformance. See docs/writing-a-plugin.md.
                    """)
            }
        }

        /// `my-rule` → `MyRule`, `fed-2x` → `Fed2x`.
        static func upperCamelCase(_ kebab: String) -> String {
            kebab.split(separator: "-").map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
        }

        /// The checkout holding Package.swift and Templates/: the override, or
        /// the nearest such ancestor of this executable.
        static func locateCheckout(override: String?) throws -> URL {
            func isCheckout(_ url: URL) -> Bool {
                let manager = FileManager.default
                return manager.fileExists(atPath: url.appendingPathComponent("Package.swift").path)
                    && manager.fileExists(atPath: url.appendingPathComponent("Templates/SwiftPlugin").path)
                    && manager.fileExists(atPath: url.appendingPathComponent("Templates/CPlugin").path)
            }
            if let override {
                let url = URL(fileURLWithPath: override).standardizedFileURL.resolvingSymlinksInPath()
                guard isCheckout(url) else { throw NewPluginError.notACheckout(path: url.path) }
                return url
            }
            let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
            var folder = URL(fileURLWithPath: executable).resolvingSymlinksInPath().deletingLastPathComponent()
            var searched: [String] = []
            while true {
                if isCheckout(folder) { return folder }
                searched.append(folder.path)
                let parent = folder.deletingLastPathComponent()
                if parent.path == folder.path { break }
                folder = parent
            }
            throw NewPluginError.checkoutNotFound(executable: executable)
        }
    }
}

/// Why `new-plugin` could not scaffold.
enum NewPluginError: Error, CustomStringConvertible {
    case outputExists(path: String)
    case checkoutNotFound(executable: String)
    case notACheckout(path: String)
    case templateMissing(path: String)
    case couldNotWrite(path: String, reason: String)

    var description: String {
        switch self {
        case .outputExists(let path):
            return "Could not create plugin folder '\(path)': it already exists\nHint: Choose another --output, or remove the folder."
        case .checkoutNotFound(let executable):
            return "Could not find the lora-agg checkout\nDetail: No folder above '\(executable)' holds Package.swift and Templates/.\nHint: Pass --lora-agg-path with the folder of your lora-agg clone."
        case .notACheckout(let path):
            return "Could not use '\(path)' as the lora-agg checkout\nDetail: It does not hold Package.swift, Templates/SwiftPlugin and Templates/CPlugin.\nHint: Pass the root folder of your lora-agg clone."
        case .templateMissing(let path):
            return "Could not read template '\(path)'\nHint: Your lora-agg checkout may be incomplete; restore Templates/ from git."
        case .couldNotWrite(let path, let reason):
            return "Could not create plugin folder '\(path)': \(reason)"
        }
    }
}
