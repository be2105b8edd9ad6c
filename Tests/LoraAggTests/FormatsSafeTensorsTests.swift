import Foundation
import Testing
@testable import LoraAggFormats

/// Helpers to craft safetensors files byte by byte.
enum Craft {
    /// A fresh temporary folder.
    static func folder() -> String {
        let path = NSTemporaryDirectory() + "lora-agg-tests-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// Length field + header text + data, with an optional wrong length.
    static func bytes(header: String, data: [UInt8], length: UInt64? = nil) -> [UInt8] {
        let headerBytes = Array(header.utf8)
        var out: [UInt8] = []
        withUnsafeBytes(of: (length ?? UInt64(headerBytes.count)).littleEndian) { out.append(contentsOf: $0) }
        return out + headerBytes + data
    }

    /// Writes bytes to a new file and returns its path.
    static func file(_ bytes: [UInt8]) -> String {
        let path = folder() + "/model.safetensors"
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return path
    }

    /// The error kind of opening `bytes` (nil when it opens).
    static func errorKind(_ bytes: [UInt8]) -> SafeTensorsError.Kind? {
        do {
            _ = try SafeTensorsFile(path: file(bytes))
            return nil
        } catch {
            return error.kind
        }
    }

    static func f32(_ values: [Float]) -> [UInt8] {
        values.flatMap { value in withUnsafeBytes(of: value.bitPattern.littleEndian) { Array($0) } }
    }
}

@Suite("safetensors reader: each malformed file is refused with its own error")
struct SafeTensorsMalformedTests {
    let eight = [UInt8](repeating: 0, count: 8)

    @Test("a well-formed file opens")
    func wellFormed() throws {
        let header = #"{"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#
        let file = try SafeTensorsFile(path: Craft.file(Craft.bytes(header: header, data: Craft.f32([1.5, -2]))))
        #expect(try file.floats(named: "x").array == [1.5, -2])
        #expect(file.metadata.first?.1 == "pt")
    }

    @Test("an empty file")
    func empty() { #expect(Craft.errorKind([]) == .emptyFile) }

    @Test("a file shorter than the length field")
    func truncatedLength() { #expect(Craft.errorKind([1, 0, 0]) == .truncated) }

    @Test("a header length above the 100 MB cap, before any allocation")
    func headerTooLarge() {
        #expect(Craft.errorKind(Craft.bytes(header: "{}", data: [], length: 100_000_001)) == .headerTooLarge)
        #expect(Craft.errorKind(Craft.bytes(header: "{}", data: [], length: UInt64.max)) == .headerTooLarge)
    }

    @Test("a header length beyond the end of the file")
    func headerBeyondFile() { #expect(Craft.errorKind(Craft.bytes(header: "{}", data: [], length: 50)) == .headerBeyondFile) }

    @Test("a header that is not JSON")
    func notJSON() {
        #expect(Craft.errorKind(Craft.bytes(header: "{\"x\":", data: [])) == .headerNotJSON)
        #expect(Craft.errorKind(Craft.bytes(header: "{}\u{0}\u{0}", data: [])) == .headerNotJSON)  // NUL padding
    }

    @Test("a header that is JSON but not an object")
    func notObject() { #expect(Craft.errorKind(Craft.bytes(header: "[1]", data: [])) == .headerNotObject) }

    @Test("a non-string __metadata__ value")
    func metadataValue() {
        #expect(Craft.errorKind(Craft.bytes(header: #"{"__metadata__":{"epoch":3}}"#, data: [])) == .invalidMetadata)
        #expect(Craft.errorKind(Craft.bytes(header: #"{"__metadata__":"pt"}"#, data: [])) == .invalidMetadata)
    }

    @Test("an unknown dtype")
    func unknownDType() {
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}}"#, data: eight.dropLast(4))) == .unknownDType)
    }

    @Test("a tensor entry without shape or with negative offsets")
    func invalidEntry() {
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","data_offsets":[0,4]}}"#, data: Array(eight.prefix(4)))) == .invalidTensorEntry)
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, data: Array(eight.prefix(4)))) == .invalidTensorEntry)
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, data: Array(eight.prefix(4)))) == .invalidTensorEntry)
    }

    @Test("shape x dtype size differs from the byte range")
    func sizeMismatch() {
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: eight)) == .sizeMismatch)
        // An element count that overflows 64 bits.
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, data: eight)) == .sizeMismatch)
    }

    @Test("offsets beyond the data area (a file cut in its data)")
    func dataBeyondFile() {
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, data: eight)) == .dataBeyondFile)
    }

    @Test("overlapping tensors")
    func overlap() {
        let header = #"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        #expect(Craft.errorKind(Craft.bytes(header: header, data: eight)) == .overlap)
    }

    @Test("a gap between tensors")
    func gap() {
        let header = #"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
        #expect(Craft.errorKind(Craft.bytes(header: header, data: eight + [0, 0, 0, 0])) == .gap)
        let late = #"{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        #expect(Craft.errorKind(Craft.bytes(header: late, data: eight)) == .gap)
    }

    @Test("trailing bytes not covered by any tensor")
    func notCovered() {
        #expect(Craft.errorKind(Craft.bytes(header: #"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: eight)) == .notCovered)
    }

    @Test("a tensor named twice")
    func duplicate() {
        let header = #"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        #expect(Craft.errorKind(Craft.bytes(header: header, data: eight)) == .duplicateTensor)
    }

    @Test("an integer tensor cannot be read as floats, and the error names file and tensor")
    func unsupportedDType() throws {
        let path = Craft.file(Craft.bytes(header: #"{"ids":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#, data: eight))
        let file = try SafeTensorsFile(path: path)
        let error = #expect(throws: SafeTensorsError.self) { try file.floats(named: "ids") }
        #expect(error?.kind == .unsupportedDType)
        #expect(error?.description.contains(path) == true && error?.description.contains("'ids'") == true)
    }

    @Test("a missing file")
    func missing() {
        #expect(throws: SafeTensorsError.self) { try SafeTensorsFile(path: "/nonexistent/x.safetensors") }
    }
}

@Suite("safetensors writer and dtypes")
struct SafeTensorsWriterTests {
    @Test("the header is padded with spaces to 8 bytes and offsets are contiguous")
    func layout() throws {
        let bytes = try SafeTensorsWriter.encode([
            TensorToWrite(name: "b", dtype: .f16, shape: [3], floats: [1, 2, 3]),
            TensorToWrite(name: "a", dtype: .f32, shape: [1, 1], floats: [7]),
        ], metadata: [("format", "pt")])
        let length = Int(bytes[0..<8].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        #expect(length % 8 == 0)
        let header = String(decoding: bytes[8..<(8 + length)], as: UTF8.self)
        #expect(header.hasSuffix(" ") || header.hasSuffix("}"))
        #expect(header.trimmingCharacters(in: .whitespaces).hasSuffix("}"))
        #expect(bytes.count == 8 + length + 4 + 6)
        let file = try SafeTensorsFile(path: Craft.file(bytes))
        // F32 (wider) is placed first so every tensor stays aligned.
        #expect(file.tensors.map(\.name) == ["a", "b"])
        #expect(file.tensors.map(\.begin) == [0, 4])
        #expect(try file.floats(named: "b").array == [1, 2, 3])
    }

    @Test("every float dtype round-trips its bytes exactly through read and write")
    func bitExact() throws {
        var generator = TestSupport.SeededGenerator(seed: 11)
        for dtype in [DType.f32, .f16, .bf16, .f64] {
            let values = (0..<37).map { _ in Float.random(in: -3..<3, using: &generator) }
            let first = try SafeTensorsWriter.encode([TensorToWrite(name: "t", dtype: dtype, shape: [37], floats: values)])
            let file = try SafeTensorsFile(path: Craft.file(first))
            let again = try SafeTensorsWriter.encode([TensorToWrite(name: "t", dtype: dtype, shape: [37], floats: file.floats(named: "t").array)])
            #expect(first == again, "dtype \(dtype)")
        }
    }

    @Test("F32 tensors are read in place from the mapping, others are converted")
    func zeroCopy() throws {
        let bytes = try SafeTensorsWriter.encode([TensorToWrite(name: "a", dtype: .f32, shape: [2], floats: [1, 2]),
                                                  TensorToWrite(name: "h", dtype: .bf16, shape: [2], floats: [1, 2])])
        let file = try SafeTensorsFile(path: Craft.file(bytes))
        #expect(try file.floats(named: "a").isBorrowed)
        #expect(try !file.floats(named: "h").isBorrowed)
    }

    @Test("BF16 rounds to nearest even and keeps NaN a NaN")
    func bf16Rounding() {
        // 1 + 2^-8 lies halfway between 1 (0x3F80) and 1 + 2^-7 (0x3F81): ties go to the even 0x3F80.
        #expect(BFloat16.encode(1 + 0x1p-8) == 0x3F80)
        // 1 + 3·2^-8 lies halfway between 0x3F81 and 0x3F82: the even one is 0x3F82.
        #expect(BFloat16.encode(1 + 3 * 0x1p-8) == 0x3F82)
        // Just above the halfway point rounds up.
        #expect(BFloat16.encode(1 + 0x1p-8 + 0x1p-20) == 0x3F81)
        #expect(BFloat16.encode(-2) == 0xC000)
        #expect(BFloat16.decode(BFloat16.encode(.nan)).isNaN)
        #expect(BFloat16.decode(BFloat16.encode(-.nan)).isNaN)
        #expect(BFloat16.encode(.infinity) == 0x7F80)
        // The largest Float rounds to infinity, as round-to-nearest-even demands.
        #expect(BFloat16.encode(.greatestFiniteMagnitude) == 0x7F80)
    }

    @Test("a value too large for F16 is refused naming the tensor")
    func f16Overflow() {
        let error = #expect(throws: SafeTensorsError.self) {
            try SafeTensorsWriter.encode([TensorToWrite(name: "big", dtype: .f16, shape: [1], floats: [1e6])])
        }
        #expect(error?.kind == .valueOutOfRange && error?.tensor == "big")
    }

    @Test("an atomic write leaves no temporary file behind")
    func atomic() throws {
        let folder = Craft.folder()
        try SafeTensorsWriter.write([TensorToWrite(name: "x", dtype: .f32, shape: [1], floats: [1])], to: folder + "/a.safetensors")
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder) == ["a.safetensors"])
        #expect(throws: (any Error).self) { try AtomicFile.write([1], to: folder + "/missing/b") }
    }
}

@Suite("safetensors reader fuzzing")
struct SafeTensorsFuzzTests {
    /// A small valid file with several dtypes and metadata, the seed of every mutation.
    static func seedFile() throws -> [UInt8] {
        try SafeTensorsWriter.encode([
            TensorToWrite(name: "base_model.model.q.lora_A.weight", dtype: .f32, shape: [2, 3], floats: [1, 2, 3, 4, 5, 6]),
            TensorToWrite(name: "base_model.model.q.lora_B.weight", dtype: .bf16, shape: [3, 2], floats: [1, 2, 3, 4, 5, 6]),
            TensorToWrite(name: "h", dtype: .f16, shape: [2], floats: [1, 2]),
            TensorToWrite(name: "d", dtype: .f64, shape: [], floats: [1]),
        ], metadata: [("format", "pt")])
    }

    /// Validates a mutated image in memory; when it passes, maps it from disk
    /// and reads every tensor. Only throwing is allowed. Returns whether it was accepted.
    @discardableResult
    static func exercise(_ bytes: [UInt8], path: String) -> Bool {
        let valid = bytes.withUnsafeBytes { buffer in (try? SafeTensorsFile.parseHeader(buffer, file: "fuzz")) != nil }
        guard valid else { return false }
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        guard let file = try? SafeTensorsFile(path: path) else { return false }
        for tensor in file.tensors { _ = try? file.floats(tensor).array }
        return true
    }

    @Test("5000 seeded mutations of a valid file never crash the reader")
    func mutations() throws {
        let seed = try Self.seedFile()
        let path = Craft.folder() + "/fuzz.safetensors"
        var generator = TestSupport.SeededGenerator(seed: 2026)
        let headerEnd = 8 + Int(seed[0..<8].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        let interesting: [UInt8] = Array("{}[]\",:0123456789-eE.ntfu\\ ".utf8) + [0, 0xFF, 0x80, 0xC0]
        var accepted = 0
        for _ in 0..<5000 {
            var bytes = seed
            for _ in 0..<Int.random(in: 1...4, using: &generator) {
                switch Int.random(in: 0..<7, using: &generator) {
                case 0: // flip a bit anywhere
                    let i = Int.random(in: 0..<bytes.count, using: &generator)
                    bytes[i] ^= 1 << UInt8.random(in: 0..<8, using: &generator)
                case 1: // replace a header byte with a JSON-significant one
                    let i = Int.random(in: 8..<min(headerEnd, bytes.count), using: &generator)
                    bytes[i] = interesting.randomElement(using: &generator)!
                case 2: // truncate
                    bytes.removeLast(Int.random(in: 0..<bytes.count, using: &generator))
                case 3: // change the header length
                    let length = [UInt64.random(in: 0..<UInt64(bytes.count + 16), using: &generator), UInt64.max, 100_000_000]
                        .randomElement(using: &generator)!
                    if bytes.count >= 8 { withUnsafeBytes(of: length.littleEndian) { for k in 0..<8 { bytes[k] = $0[k] } } }
                case 4: // insert bytes into the header
                    let i = Int.random(in: 8...min(headerEnd, bytes.count), using: &generator)
                    bytes.insert(contentsOf: (0..<Int.random(in: 1...4, using: &generator)).map { _ in interesting.randomElement(using: &generator)! }, at: i)
                case 5: // change a digit in the header (shapes and offsets)
                    let digits = (8..<min(headerEnd, bytes.count)).filter { (48...57).contains(bytes[$0]) }
                    if let i = digits.randomElement(using: &generator) { bytes[i] = UInt8.random(in: 48...57, using: &generator) }
                default: // append garbage
                    bytes += (0..<Int.random(in: 1...9, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
                }
                if bytes.count < 8 { break }
            }
            if Self.exercise(bytes, path: path) { accepted += 1 }
        }
        // Most mutations must be refused; a few (e.g. a flipped data bit) stay valid.
        #expect(accepted > 0 && accepted < 5000)
    }

    @Test("deeply nested or huge-number headers are refused, not crashed on")
    func hostileHeaders() {
        let deep = String(repeating: "[", count: 100_000)
        #expect(Craft.errorKind(Craft.bytes(header: deep, data: [])) == .headerNotJSON)
        let huge = #"{"x":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}"#
        #expect(Craft.errorKind(Craft.bytes(header: huge, data: [0, 0, 0, 0])) == .invalidTensorEntry)
        let bigOffset = #"{"x":{"dtype":"F32","shape":[1],"data_offsets":[9223372036854775807,9223372036854775807]}}"#
        #expect(Craft.errorKind(Craft.bytes(header: bigOffset, data: [0, 0, 0, 0])) != nil)
    }
}
