import Foundation

/// The value of one hyperparameter.
public enum ParameterValue: Sendable, Equatable, CustomStringConvertible {
    case number(Double)
    case integer(Int)
    case string(String)
    case boolean(Bool)

    public var description: String {
        switch self {
        case .number(let v): return v == v.rounded() && abs(v) < 1e15 ? String(format: "%g", v) : "\(v)"
        case .integer(let v): return "\(v)"
        case .string(let v): return v
        case .boolean(let v): return v ? "true" : "false"
        }
    }

    var jsonObject: Any {
        switch self {
        case .number(let v): return v
        case .integer(let v): return v
        case .string(let v): return v
        case .boolean(let v): return v
        }
    }
}

/// The declaration of one hyperparameter: name, type, default, range and meaning.
public struct ParameterSpec: Sendable, Equatable {
    /// The type of a hyperparameter.
    public enum Kind: String, Sendable {
        case number, integer, string, boolean
    }

    public var name: String
    public var kind: Kind
    public var defaultValue: ParameterValue
    /// Inclusive lower bound for numbers and integers.
    public var minimum: Double?
    /// Inclusive upper bound for numbers and integers.
    public var maximum: Double?
    /// Allowed values for strings.
    public var choices: [String]?
    public var help: String

    /// A real-valued hyperparameter.
    public static func number(_ name: String, default value: Double, minimum: Double? = nil,
                              maximum: Double? = nil, help: String) -> ParameterSpec {
        ParameterSpec(name: name, kind: .number, defaultValue: .number(value), minimum: minimum,
                      maximum: maximum, choices: nil, help: help)
    }

    /// An integer hyperparameter.
    public static func integer(_ name: String, default value: Int, minimum: Int? = nil,
                               maximum: Int? = nil, help: String) -> ParameterSpec {
        ParameterSpec(name: name, kind: .integer, defaultValue: .integer(value),
                      minimum: minimum.map(Double.init), maximum: maximum.map(Double.init),
                      choices: nil, help: help)
    }

    /// A string hyperparameter restricted to `choices`.
    public static func choice(_ name: String, default value: String, choices: [String],
                              help: String) -> ParameterSpec {
        ParameterSpec(name: name, kind: .string, defaultValue: .string(value), minimum: nil,
                      maximum: nil, choices: choices, help: help)
    }

    /// A boolean hyperparameter.
    public static func boolean(_ name: String, default value: Bool, help: String) -> ParameterSpec {
        ParameterSpec(name: name, kind: .boolean, defaultValue: .boolean(value), minimum: nil,
                      maximum: nil, choices: nil, help: help)
    }

    /// Problems with the declaration itself.
    var problems: [String] {
        var found: [String] = []
        if !StrategyInfo.isKebabCase(name.replacingOccurrences(of: "_", with: "-")) { found.append("name is not snake_case or kebab-case") }
        if help.isEmpty { found.append("description is empty") }
        do { _ = try validate(defaultValue) } catch let error as AggregationError { found.append("default \(error.message)") } catch {}
        return found
    }

    /// Checks a value against type, range and choices; returns it normalised.
    public func validate(_ value: ParameterValue) throws -> ParameterValue {
        let normalised: ParameterValue
        switch (kind, value) {
        case (.number, .number), (.integer, .integer), (.string, .string), (.boolean, .boolean):
            normalised = value
        case (.number, .integer(let v)):
            normalised = .number(Double(v))
        case (.integer, .number(let v)) where v == v.rounded() && abs(v) < 1e15:
            normalised = .integer(Int(v))
        default:
            throw AggregationError.invalidConfig("invalid value '\(value)' for parameter '\(name)': expected \(kindPhrase)")
        }
        if case .number(let v) = normalised, !v.isFinite {
            throw AggregationError.invalidConfig("invalid value '\(value)' for parameter '\(name)': expected a finite number")
        }
        let numeric: Double? = {
            switch normalised {
            case .number(let v): return v
            case .integer(let v): return Double(v)
            default: return nil
            }
        }()
        if let numeric {
            if let minimum, numeric < minimum {
                throw AggregationError.invalidConfig("invalid value '\(value)' for parameter '\(name)': must be at least \(ParameterValue.number(minimum))")
            }
            if let maximum, numeric > maximum {
                throw AggregationError.invalidConfig("invalid value '\(value)' for parameter '\(name)': must be at most \(ParameterValue.number(maximum))")
            }
        }
        if case .string(let text) = normalised, let choices, !choices.contains(text) {
            throw AggregationError.invalidConfig("invalid value '\(text)' for parameter '\(name)': expected one of \(choices.map { "'\($0)'" }.joined(separator: ", "))")
        }
        return normalised
    }

    /// Parses a command-line string such as `0.01`, `true` or `dense`.
    public func parse(_ text: String) throws -> ParameterValue {
        switch kind {
        case .number:
            guard let v = Double(text) else {
                throw AggregationError.invalidConfig("invalid value '\(text)' for parameter '\(name)': expected \(kindPhrase)")
            }
            return try validate(.number(v))
        case .integer:
            guard let v = Int(text) else {
                throw AggregationError.invalidConfig("invalid value '\(text)' for parameter '\(name)': expected \(kindPhrase)")
            }
            return try validate(.integer(v))
        case .boolean:
            switch text.lowercased() {
            case "true", "1", "yes": return .boolean(true)
            case "false", "0", "no": return .boolean(false)
            default:
                throw AggregationError.invalidConfig("invalid value '\(text)' for parameter '\(name)': expected true or false")
            }
        case .string:
            return try validate(.string(text))
        }
    }

    private var kindPhrase: String {
        switch kind {
        case .number: return "a number"
        case .integer: return "an integer"
        case .string: return choices.map { "one of " + $0.map { "'\($0)'" }.joined(separator: ", ") } ?? "a string"
        case .boolean: return "true or false"
        }
    }

    /// The JSON object of the ABI's parameters schema.
    var jsonObject: [String: Any] {
        var object: [String: Any] = ["name": name, "type": kind.rawValue,
                                     "default": defaultValue.jsonObject, "description": help]
        if let minimum { object["minimum"] = minimum }
        if let maximum { object["maximum"] = maximum }
        if let choices { object["choices"] = choices }
        return object
    }

    /// Encodes a list of declarations as the ABI's JSON schema string.
    public static func schemaJSON(_ specs: [ParameterSpec]) -> String {
        let data = try! JSONSerialization.data(withJSONObject: specs.map(\.jsonObject), options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// Decodes the ABI's JSON schema string.
    public static func decodeSchema(_ json: String) throws -> [ParameterSpec] {
        guard let array = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] else {
            throw AggregationError.invalidConfig("parameters schema is not a JSON array of objects")
        }
        return try array.map { object in
            guard let name = object["name"] as? String, let type = object["type"] as? String,
                  let kind = Kind(rawValue: type) else {
                throw AggregationError.invalidConfig("parameters schema entry lacks a valid 'name' or 'type'")
            }
            guard let raw = object["default"], let value = ParameterValue(json: raw, kind: kind) else {
                throw AggregationError.invalidConfig("parameter '\(name)' has no valid default")
            }
            return ParameterSpec(name: name, kind: kind, defaultValue: value,
                                 minimum: (object["minimum"] as? NSNumber)?.doubleValue,
                                 maximum: (object["maximum"] as? NSNumber)?.doubleValue,
                                 choices: object["choices"] as? [String],
                                 help: object["description"] as? String ?? "")
        }
    }
}

extension ParameterValue {
    /// Reads a JSON value as the given kind; `nil` when the JSON type does not fit.
    init?(json: Any, kind: ParameterSpec.Kind) {
        switch kind {
        case .boolean:
            guard let bool = json as? Bool else { return nil }
            self = .boolean(bool)
        case .number, .integer:
            guard let number = json as? NSNumber else { return nil }
            if kind == .integer {
                let v = number.doubleValue
                guard v == v.rounded(), abs(v) < 1e15 else { return nil }
                self = .integer(Int(v))
            } else {
                self = .number(number.doubleValue)
            }
        case .string:
            guard let text = json as? String else { return nil }
            self = .string(text)
        }
    }
}

/// The checked hyperparameters a strategy is built with.
public struct StrategyParameters: Sendable, Equatable {
    /// Every declared parameter's value, defaults filled in.
    public private(set) var values: [String: ParameterValue]

    /// Fills in defaults and checks `given` against the declarations.
    public init(specs: [ParameterSpec], given: [String: ParameterValue] = [:]) throws {
        let known = Dictionary(uniqueKeysWithValues: specs.map { ($0.name, $0) })
        for key in given.keys.sorted() where known[key] == nil {
            throw AggregationError.invalidConfig(StrategyParameters.unknownMessage(key, specs: specs))
        }
        var values: [String: ParameterValue] = [:]
        for spec in specs {
            values[spec.name] = try given[spec.name].map(spec.validate) ?? spec.defaultValue
        }
        self.values = values
    }

    /// Parses the ABI's JSON object of hyperparameters.
    public init(specs: [ParameterSpec], json: String) throws {
        let trimmed = json.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let object = (trimmed.isEmpty ? [:] : try? JSONSerialization.jsonObject(with: Data(trimmed.utf8))) as? [String: Any] else {
            throw AggregationError.invalidConfig("hyperparameters are not a JSON object: '\(json.prefix(80))'")
        }
        let known = Dictionary(uniqueKeysWithValues: specs.map { ($0.name, $0) })
        var given: [String: ParameterValue] = [:]
        for (key, raw) in object {
            guard let spec = known[key] else {
                throw AggregationError.invalidConfig(StrategyParameters.unknownMessage(key, specs: specs))
            }
            guard let value = ParameterValue(json: raw, kind: spec.kind)
                    ?? (spec.kind == .number ? ParameterValue(json: raw, kind: .integer) : nil) else {
                throw AggregationError.invalidConfig("invalid value '\(raw)' for parameter '\(key)': expected \(spec.kind.rawValue)")
            }
            given[key] = value
        }
        try self.init(specs: specs, given: given)
    }

    /// Parses command-line `key=value` strings against the declarations.
    public init(specs: [ParameterSpec], assignments: [String]) throws {
        let known = Dictionary(uniqueKeysWithValues: specs.map { ($0.name, $0) })
        var given: [String: ParameterValue] = [:]
        for assignment in assignments {
            guard let equals = assignment.firstIndex(of: "=") else {
                throw AggregationError.invalidConfig("invalid parameter '\(assignment)': expected key=value")
            }
            let key = String(assignment[..<equals]), text = String(assignment[assignment.index(after: equals)...])
            guard let spec = known[key] else {
                throw AggregationError.invalidConfig(StrategyParameters.unknownMessage(key, specs: specs))
            }
            given[key] = try spec.parse(text)
        }
        try self.init(specs: specs, given: given)
    }

    private static func unknownMessage(_ key: String, specs: [ParameterSpec]) -> String {
        let names = specs.map(\.name)
        if names.isEmpty { return "unrecognized parameter '\(key)': this strategy takes no parameters" }
        var message = "unrecognized parameter '\(key)'; known: \(names.joined(separator: ", "))"
        if let near = closestName(to: key, among: names) { message += " (did you mean '\(near)'?)" }
        return message
    }

    /// The JSON object passed to a plugin's `create`.
    public var json: String {
        let data = try! JSONSerialization.data(withJSONObject: values.mapValues(\.jsonObject), options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// A real-valued parameter (integers are widened).
    public func number(_ name: String) -> Double {
        switch values[name] {
        case .number(let v)?: return v
        case .integer(let v)?: return Double(v)
        default: preconditionFailure("parameter '\(name)' is not a declared number")
        }
    }

    /// An integer parameter.
    public func integer(_ name: String) -> Int {
        guard case .integer(let v)? = values[name] else { preconditionFailure("parameter '\(name)' is not a declared integer") }
        return v
    }

    /// A string parameter.
    public func string(_ name: String) -> String {
        guard case .string(let v)? = values[name] else { preconditionFailure("parameter '\(name)' is not a declared string") }
        return v
    }

    /// A boolean parameter.
    public func boolean(_ name: String) -> Bool {
        guard case .boolean(let v)? = values[name] else { preconditionFailure("parameter '\(name)' is not a declared boolean") }
        return v
    }
}

/// The name in `names` nearest to `text` by edit distance, if reasonably near.
public func closestName(to text: String, among names: [String]) -> String? {
    func distance(_ a: [Character], _ b: [Character]) -> Int {
        var previous = Array(0...b.count)
        for (i, ca) in a.enumerated() {
            var current = [i + 1]
            for (j, cb) in b.enumerated() {
                current.append(Swift.min(previous[j + 1] + 1, current[j] + 1, previous[j] + (ca == cb ? 0 : 1)))
            }
            previous = current
        }
        return previous[b.count]
    }
    let scored = names.map { ($0, distance(Array(text.lowercased()), Array($0.lowercased()))) }
    guard let best = scored.min(by: { $0.1 < $1.1 }) else { return nil }
    let contains = names.first { $0.contains(text.lowercased()) || text.lowercased().contains($0) }
    if best.1 <= Swift.max(2, best.0.count / 3) { return best.0 }
    return contains
}
