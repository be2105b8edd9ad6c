/// A small JSON value type and parser that keep object key order and report
/// duplicate keys.
///
/// Foundation's `JSONSerialization` returns unordered dictionaries and keeps
/// one of two duplicate keys silently. Both matter here: PEFT's
/// `rank_pattern` / `alpha_pattern` are matched first-key-wins in file order,
/// and a safetensors header with a tensor named twice must be refused.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    /// A number with its literal text, so integers such as `16` are written back as written.
    case number(Double, literal: String)
    case string(String)
    case array([JSONValue])
    /// Members in document order.
    case object([(String, JSONValue)])

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.number(x, _), .number(y, _)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    /// A number value from a Double, written as an integer when it is one.
    public static func number(_ value: Double) -> JSONValue {
        .number(value, literal: JSONValue.format(value))
    }

    /// A number value from an Int.
    public static func integer(_ value: Int) -> JSONValue { .number(Double(value), literal: String(value)) }

    /// The member `key` of an object (the first one), or nil.
    public subscript(key: String) -> JSONValue? {
        if case .object(let members) = self { return members.first { $0.0 == key }?.1 }
        return nil
    }

    /// The members of an object, or nil.
    public var objectMembers: [(String, JSONValue)]? {
        if case .object(let members) = self { return members }
        return nil
    }

    /// The string, or nil.
    public var stringValue: String? {
        if case .string(let text) = self { return text }
        return nil
    }

    /// The number, or nil.
    public var doubleValue: Double? {
        if case .number(let value, _) = self { return value }
        return nil
    }

    /// The number when it is an exact integer, or nil.
    public var intValue: Int? {
        if case .number(let value, _) = self, value.rounded() == value, abs(value) < 9.0e15 { return Int(value) }
        return nil
    }

    /// The boolean, or nil.
    public var boolValue: Bool? {
        if case .bool(let flag) = self { return flag }
        return nil
    }

    /// The elements of an array, or nil.
    public var arrayValue: [JSONValue]? {
        if case .array(let items) = self { return items }
        return nil
    }

    /// Whether this is `null`.
    public var isNull: Bool { if case .null = self { return true } else { return false } }

    /// Sets (replacing in place, or appending) the member `key` of an object.
    public mutating func set(_ key: String, _ value: JSONValue?) {
        guard case .object(var members) = self else { return }
        if let index = members.firstIndex(where: { $0.0 == key }) {
            if let value { members[index].1 = value } else { members.remove(at: index) }
        } else if let value {
            members.append((key, value))
        }
        self = .object(members)
    }

    /// A short name of the value's type, for messages.
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .number: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }

    // MARK: Writing

    /// Compact JSON text.
    public var compact: String {
        var out = ""
        write(into: &out, indent: nil, level: 0)
        return out
    }

    /// Indented JSON text (two spaces), as PEFT and humans like it.
    public var pretty: String {
        var out = ""
        write(into: &out, indent: "  ", level: 0)
        return out + "\n"
    }

    private func write(into out: inout String, indent: String?, level: Int) {
        switch self {
        case .null: out += "null"
        case .bool(let flag): out += flag ? "true" : "false"
        case .number(_, let literal): out += literal
        case .string(let text): JSONValue.writeString(text, into: &out)
        case .array(let items):
            if items.isEmpty { out += "[]"; return }
            out += "["
            for (index, item) in items.enumerated() {
                if index > 0 { out += indent == nil ? "," : ", " }
                item.write(into: &out, indent: nil, level: level + 1)
            }
            out += "]"
        case .object(let members):
            if members.isEmpty { out += "{}"; return }
            out += "{"
            for (index, (key, value)) in members.enumerated() {
                if index > 0 { out += "," }
                if let indent { out += "\n" + String(repeating: indent, count: level + 1) }
                JSONValue.writeString(key, into: &out)
                out += indent == nil ? ":" : ": "
                value.write(into: &out, indent: indent, level: level + 1)
            }
            if let indent { out += "\n" + String(repeating: indent, count: level) }
            out += "}"
        }
    }

    static func writeString(_ text: String, into out: inout String) {
        out += "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }

    /// Shortest round-tripping text of a finite Double; integers without a fraction.
    static func format(_ value: Double) -> String {
        if value.isFinite, value.rounded() == value, abs(value) < 1e15 { return String(Int(value)) }
        return value.isFinite ? "\(value)" : "null"
    }

    // MARK: Parsing

    /// Why text is not acceptable JSON.
    public struct ParseError: Error, CustomStringConvertible, Sendable, Equatable {
        /// What is wrong.
        public var reason: String
        /// Byte offset in the text.
        public var offset: Int
        /// A duplicated object key, when that is the problem.
        public var duplicateKey: String?
        public var description: String { "\(reason) at byte \(offset)" }
    }

    /// Parses UTF-8 JSON text. Duplicate keys in any object are an error
    /// (with ``ParseError/duplicateKey`` set); nesting is limited to 64 levels
    /// so that hostile input cannot exhaust the stack.
    public static func parse(_ bytes: UnsafeBufferPointer<UInt8>) throws(ParseError) -> JSONValue {
        var parser = Parser(bytes: bytes)
        parser.skipSpace()
        let value = try parser.value(depth: 0)
        parser.skipSpace()
        if parser.position != bytes.count { throw parser.fail("unexpected text after the JSON value") }
        return value
    }

    /// Parses JSON text.
    public static func parse(_ text: String) throws(ParseError) -> JSONValue {
        var copy = text
        var outcome: Result<JSONValue, ParseError> = .failure(ParseError(reason: "empty", offset: 0))
        copy.withUTF8 { buffer in
            do throws(ParseError) { outcome = .success(try parse(buffer)) } catch { outcome = .failure(error) }
        }
        return try outcome.get()
    }

    /// Parses JSON bytes.
    public static func parse(_ bytes: [UInt8]) throws(ParseError) -> JSONValue {
        var outcome: Result<JSONValue, ParseError> = .failure(ParseError(reason: "empty", offset: 0))
        bytes.withUnsafeBufferPointer { buffer in
            do throws(ParseError) { outcome = .success(try parse(buffer)) } catch { outcome = .failure(error) }
        }
        return try outcome.get()
    }

    private struct Parser {
        let bytes: UnsafeBufferPointer<UInt8>
        var position = 0

        func fail(_ reason: String, duplicateKey: String? = nil) -> ParseError {
            ParseError(reason: reason, offset: position, duplicateKey: duplicateKey)
        }

        mutating func skipSpace() {
            while position < bytes.count {
                let byte = bytes[position]
                guard byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 else { return }
                position += 1
            }
        }

        mutating func value(depth: Int) throws(ParseError) -> JSONValue {
            guard depth < 64 else { throw fail("nesting deeper than 64 levels") }
            guard position < bytes.count else { throw fail("unexpected end of text") }
            switch bytes[position] {
            case UInt8(ascii: "{"):
                position += 1
                var members: [(String, JSONValue)] = []
                var seen = Set<String>()
                skipSpace()
                if position < bytes.count, bytes[position] == UInt8(ascii: "}") { position += 1; return .object([]) }
                while true {
                    skipSpace()
                    guard position < bytes.count, bytes[position] == UInt8(ascii: "\"") else { throw fail("expected a string key") }
                    let keyStart = position
                    let key = try string()
                    if !seen.insert(key).inserted {
                        position = keyStart
                        throw fail("duplicate key '\(key)'", duplicateKey: key)
                    }
                    skipSpace()
                    guard position < bytes.count, bytes[position] == UInt8(ascii: ":") else { throw fail("expected ':'") }
                    position += 1
                    skipSpace()
                    members.append((key, try value(depth: depth + 1)))
                    skipSpace()
                    guard position < bytes.count else { throw fail("unexpected end of text in an object") }
                    if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
                    if bytes[position] == UInt8(ascii: "}") { position += 1; return .object(members) }
                    throw fail("expected ',' or '}'")
                }
            case UInt8(ascii: "["):
                position += 1
                var items: [JSONValue] = []
                skipSpace()
                if position < bytes.count, bytes[position] == UInt8(ascii: "]") { position += 1; return .array([]) }
                while true {
                    skipSpace()
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    guard position < bytes.count else { throw fail("unexpected end of text in an array") }
                    if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
                    if bytes[position] == UInt8(ascii: "]") { position += 1; return .array(items) }
                    throw fail("expected ',' or ']'")
                }
            case UInt8(ascii: "\""):
                return .string(try string())
            case UInt8(ascii: "t"): try literal("true"); return .bool(true)
            case UInt8(ascii: "f"): try literal("false"); return .bool(false)
            case UInt8(ascii: "n"): try literal("null"); return .null
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                return try number()
            default:
                throw fail("unexpected character")
            }
        }

        mutating func literal(_ word: StaticString) throws(ParseError) {
            let count = word.utf8CodeUnitCount
            guard position + count <= bytes.count else { throw fail("unexpected end of text") }
            for index in 0..<count where bytes[position + index] != word.utf8Start[index] {
                throw fail("invalid literal")
            }
            position += count
        }

        mutating func number() throws(ParseError) -> JSONValue {
            let start = position
            if bytes[position] == UInt8(ascii: "-") { position += 1 }
            func digits(_ parser: inout Parser) -> Int {
                let from = parser.position
                while parser.position < parser.bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(parser.bytes[parser.position]) {
                    parser.position += 1
                }
                return parser.position - from
            }
            let intDigits = digits(&self)
            if intDigits == 0 { throw fail("invalid number") }
            if intDigits > 1, bytes[position - intDigits] == UInt8(ascii: "0") { throw fail("invalid number (leading zero)") }
            if position < bytes.count, bytes[position] == UInt8(ascii: ".") {
                position += 1
                if digits(&self) == 0 { throw fail("invalid number") }
            }
            if position < bytes.count, bytes[position] == UInt8(ascii: "e") || bytes[position] == UInt8(ascii: "E") {
                position += 1
                if position < bytes.count, bytes[position] == UInt8(ascii: "+") || bytes[position] == UInt8(ascii: "-") { position += 1 }
                if digits(&self) == 0 { throw fail("invalid number") }
            }
            let literal = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
            guard let value = Double(literal) else { throw fail("invalid number") }
            return .number(value, literal: literal)
        }

        mutating func string() throws(ParseError) -> String {
            position += 1  // opening quote
            var scalars = String.UnicodeScalarView()
            var runStart = position
            func flush(_ parser: Parser, _ scalars: inout String.UnicodeScalarView, to end: Int) -> Bool {
                guard end > runStart else { return true }
                let run = UnsafeBufferPointer(rebasing: parser.bytes[runStart..<end])
                guard let text = String(validating: run, as: UTF8.self) else { return false }
                scalars.append(contentsOf: text.unicodeScalars)
                return true
            }
            while true {
                guard position < bytes.count else { throw fail("unterminated string") }
                let byte = bytes[position]
                if byte == UInt8(ascii: "\"") {
                    guard flush(self, &scalars, to: position) else { throw fail("invalid UTF-8 in a string") }
                    position += 1
                    return String(scalars)
                }
                if byte < 0x20 { throw fail("control character in a string") }
                if byte == UInt8(ascii: "\\") {
                    guard flush(self, &scalars, to: position) else { throw fail("invalid UTF-8 in a string") }
                    position += 1
                    guard position < bytes.count else { throw fail("unterminated string") }
                    let escape = bytes[position]
                    position += 1
                    switch escape {
                    case UInt8(ascii: "\""): scalars.append("\"")
                    case UInt8(ascii: "\\"): scalars.append("\\")
                    case UInt8(ascii: "/"): scalars.append("/")
                    case UInt8(ascii: "b"): scalars.append("\u{08}")
                    case UInt8(ascii: "f"): scalars.append("\u{0C}")
                    case UInt8(ascii: "n"): scalars.append("\n")
                    case UInt8(ascii: "r"): scalars.append("\r")
                    case UInt8(ascii: "t"): scalars.append("\t")
                    case UInt8(ascii: "u"):
                        var code = try hex4()
                        if (0xD800..<0xDC00).contains(code) {
                            guard position + 1 < bytes.count, bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u") else {
                                throw fail("unpaired surrogate in a string")
                            }
                            position += 2
                            let low = try hex4()
                            guard (0xDC00..<0xE000).contains(low) else { throw fail("unpaired surrogate in a string") }
                            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        }
                        guard let scalar = Unicode.Scalar(code) else { throw fail("invalid \\u escape") }
                        scalars.append(scalar)
                    default: throw fail("invalid escape")
                    }
                    runStart = position
                    continue
                }
                position += 1
            }
        }

        mutating func hex4() throws(ParseError) -> UInt32 {
            guard position + 4 <= bytes.count else { throw fail("invalid \\u escape") }
            var code: UInt32 = 0
            for _ in 0..<4 {
                let byte = bytes[position]
                let digit: UInt32
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(byte - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(byte - UInt8(ascii: "a") + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(byte - UInt8(ascii: "A") + 10)
                default: throw fail("invalid \\u escape")
                }
                code = code * 16 + digit
                position += 1
            }
            return code
        }
    }
}
