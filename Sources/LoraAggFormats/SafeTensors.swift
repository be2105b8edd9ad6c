import Foundation
import LoraAggCore
#if canImport(Glibc)
import Glibc
#endif

/// A safetensors element type.
///
/// Every dtype the reference implementation (safetensors 0.8) accepts is
/// known, so a header naming one of them is valid; only F32, F16, BF16 and
/// F64 can be converted to Float32 for aggregation.
public enum DType: String, Sendable, CaseIterable {
    case bool = "BOOL", f4 = "F4", f6e2m3 = "F6_E2M3", f6e3m2 = "F6_E3M2", u8 = "U8", i8 = "I8"
    case f8e5m2 = "F8_E5M2", f8e4m3 = "F8_E4M3", f8e8m0 = "F8_E8M0", f8e4m3fnuz = "F8_E4M3FNUZ", f8e5m2fnuz = "F8_E5M2FNUZ"
    case i16 = "I16", u16 = "U16", f16 = "F16", bf16 = "BF16", i32 = "I32", u32 = "U32", f32 = "F32"
    case c64 = "C64", f64 = "F64", i64 = "I64", u64 = "U64"

    /// Bits per element (F4 and F6 are bit-packed).
    public var bits: Int {
        switch self {
        case .f4: return 4
        case .f6e2m3, .f6e3m2: return 6
        case .bool, .u8, .i8, .f8e5m2, .f8e4m3, .f8e8m0, .f8e4m3fnuz, .f8e5m2fnuz: return 8
        case .i16, .u16, .f16, .bf16: return 16
        case .i32, .u32, .f32: return 32
        case .c64, .f64, .i64, .u64: return 64
        }
    }

    /// Whether tensors of this type can be read as Float32.
    public var isFloatConvertible: Bool { [.f32, .f16, .bf16, .f64].contains(self) }

    /// Parses a command-line spelling such as `bf16` or `F32`.
    public init?(userSpelling text: String) {
        guard let value = DType(rawValue: text.uppercased()), value.isFloatConvertible else { return nil }
        self = value
    }
}

/// Why a safetensors file was refused. The kind is what tests assert; the
/// description names the file and the tensor.
public struct SafeTensorsError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The kinds of malformed input, one per check.
    public enum Kind: String, Sendable {
        case cannotOpen, emptyFile, truncated, headerTooLarge, headerBeyondFile, headerNotJSON, headerNotObject
        case invalidMetadata, invalidTensorEntry, duplicateTensor, unknownDType, sizeMismatch
        case dataBeyondFile, overlap, gap, notCovered, unsupportedDType, valueOutOfRange, writeFailed
    }
    public var kind: Kind
    /// The file.
    public var file: String
    /// The tensor concerned, if any.
    public var tensor: String?
    /// What is wrong, expected vs found.
    public var detail: String

    public init(_ kind: Kind, file: String, tensor: String? = nil, _ detail: String) {
        self.kind = kind
        self.file = file
        self.tensor = tensor
        self.detail = detail
    }

    public var description: String {
        "invalid safetensors file '\(file)'" + (tensor.map { ", tensor '\($0)'" } ?? "") + ": " + detail
    }
}

/// One tensor's header entry.
public struct TensorInfo: Sendable, Equatable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    /// Byte range relative to the start of the data area.
    public var begin: Int
    public var end: Int
    /// Number of elements.
    public var count: Int { shape.reduce(1, *) }
    public var byteCount: Int { end - begin }
}

/// A read-only memory mapping of a whole file, unmapped when released.
final class MappedFile: @unchecked Sendable {
    let base: UnsafeRawPointer
    let size: Int

    init(path: String) throws(SafeTensorsError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw SafeTensorsError(.cannotOpen, file: path, "could not open: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw SafeTensorsError(.cannotOpen, file: path, "could not stat: \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw SafeTensorsError(.cannotOpen, file: path, "not a regular file")
        }
        size = Int(info.st_size)
        guard size > 0 else { throw SafeTensorsError(.emptyFile, file: path, "the file is empty; expected an 8-byte header length, a JSON header and tensor data") }
        guard let mapped = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), mapped != MAP_FAILED else {
            throw SafeTensorsError(.cannotOpen, file: path, "could not map: \(String(cString: strerror(errno)))")
        }
        base = UnsafeRawPointer(mapped)
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), size) }
}

/// Float32 values that are either borrowed from a mapping (F32 tensors at a
/// 4-byte aligned offset) or converted into memory this object owns.
public final class FloatStorage: @unchecked Sendable {
    /// The values; valid while this object is alive.
    public let pointer: UnsafePointer<Float>
    public let count: Int
    private let owned: UnsafeMutablePointer<Float>?
    // Keeps the mapping alive while views of it exist.
    private let keepAlive: AnyObject?

    init(borrowing pointer: UnsafePointer<Float>, count: Int, owner: AnyObject) {
        self.pointer = pointer
        self.count = count
        self.owned = nil
        self.keepAlive = owner
    }

    init(count: Int, fill: (UnsafeMutablePointer<Float>) -> Void) {
        let memory = UnsafeMutablePointer<Float>.allocate(capacity: max(count, 1))
        memory.initialize(repeating: 0, count: max(count, 1))
        fill(memory)
        self.pointer = UnsafePointer(memory)
        self.count = count
        self.owned = memory
        self.keepAlive = nil
    }

    deinit { owned?.deallocate() }

    /// Whether the values point into the file mapping (no copy was made).
    public var isBorrowed: Bool { owned == nil }

    /// A matrix view of the values.
    public func view(rows: Int, cols: Int) -> MatrixView {
        precondition(rows * cols == count)
        return MatrixView(rows: rows, cols: cols, base: pointer)
    }

    /// The values as an array.
    public var array: [Float] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}

/// A validated, memory-mapped safetensors file.
///
/// Opening maps the file and checks the whole header before anything else
/// reads it; tensor data is then read in place (F32) or converted on demand,
/// so a large adapter set is never held in memory twice.
public final class SafeTensorsFile: @unchecked Sendable {
    /// Header size limit of the reference implementation (`MAX_HEADER_SIZE`).
    public static let maxHeaderSize = 100_000_000

    /// The path, for messages.
    public let path: String
    /// Tensors in file (offset) order.
    public let tensors: [TensorInfo]
    /// `__metadata__`, in header order.
    public let metadata: [(String, String)]
    private let mapping: MappedFile
    private let dataStart: Int
    private let index: [String: Int]

    /// Maps and validates `path`.
    public init(path: String) throws(SafeTensorsError) {
        let mapping = try MappedFile(path: path)
        let parsed = try Self.parseHeader(UnsafeRawBufferPointer(start: mapping.base, count: mapping.size), file: path)
        self.path = path
        self.mapping = mapping
        self.tensors = parsed.tensors
        self.metadata = parsed.metadata
        self.dataStart = parsed.dataStart
        var index: [String: Int] = [:]
        for (position, tensor) in parsed.tensors.enumerated() { index[tensor.name] = position }
        self.index = index
    }

    /// The names of the tensors, sorted.
    public var names: [String] { tensors.map(\.name).sorted() }

    /// The header entry of `name`.
    public func info(_ name: String) -> TensorInfo? { index[name].map { tensors[$0] } }

    /// The raw little-endian bytes of a tensor, borrowed from the mapping.
    public func rawBytes(_ tensor: TensorInfo) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: mapping.base + dataStart + tensor.begin, count: tensor.byteCount)
    }

    /// A copy of the raw bytes of a tensor.
    public func rawData(_ tensor: TensorInfo) -> [UInt8] { Array(rawBytes(tensor)) }

    /// The tensor as Float32: borrowed from the mapping for aligned F32, converted otherwise.
    public func floats(_ tensor: TensorInfo) throws(SafeTensorsError) -> FloatStorage {
        let bytes = rawBytes(tensor)
        let count = tensor.count
        switch tensor.dtype {
        case .f32:
            if let base = bytes.baseAddress, Int(bitPattern: base) % MemoryLayout<Float>.alignment == 0 {
                return FloatStorage(borrowing: base.assumingMemoryBound(to: Float.self), count: count, owner: mapping)
            }
            return FloatStorage(count: count) { out in
                for i in 0..<count { out[i] = Float(bitPattern: bytes.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self).littleEndian) }
            }
        case .f16:
            return FloatStorage(count: count) { out in
                for i in 0..<count { out[i] = Float(Float16(bitPattern: bytes.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self).littleEndian)) }
            }
        case .bf16:
            return FloatStorage(count: count) { out in
                for i in 0..<count { out[i] = BFloat16.decode(bytes.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self).littleEndian) }
            }
        case .f64:
            return FloatStorage(count: count) { out in
                for i in 0..<count { out[i] = Float(Double(bitPattern: bytes.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self).littleEndian)) }
            }
        default:
            throw SafeTensorsError(.unsupportedDType, file: path, tensor: tensor.name,
                                   "dtype \(tensor.dtype.rawValue) cannot be read as floating point; expected F32, F16, BF16 or F64")
        }
    }

    /// Convenience: the tensor `name` as Float32 values.
    public func floats(named name: String) throws(SafeTensorsError) -> FloatStorage {
        guard let tensor = info(name) else {
            throw SafeTensorsError(.invalidTensorEntry, file: path, tensor: name, "no such tensor")
        }
        return try floats(tensor)
    }

    // MARK: Header validation

    struct ParsedHeader {
        var tensors: [TensorInfo]
        var metadata: [(String, String)]
        var dataStart: Int
    }

    /// Validates a complete file image: every check of the reference reader
    /// plus duplicate names, in an order that never reads beyond the buffer.
    static func parseHeader(_ file: UnsafeRawBufferPointer, file path: String) throws(SafeTensorsError) -> ParsedHeader {
        if file.count == 0 {
            throw SafeTensorsError(.emptyFile, file: path, "the file is empty; expected an 8-byte header length, a JSON header and tensor data")
        }
        if file.count < 8 {
            throw SafeTensorsError(.truncated, file: path, "the file has \(file.count) bytes; expected at least 8 (the header length)")
        }
        let declared = file.loadUnaligned(as: UInt64.self).littleEndian
        if declared > UInt64(maxHeaderSize) {
            throw SafeTensorsError(.headerTooLarge, file: path, "header length is \(declared) bytes; the limit is \(maxHeaderSize)")
        }
        let headerLength = Int(declared)
        if 8 + headerLength > file.count {
            throw SafeTensorsError(.headerBeyondFile, file: path, "header length is \(headerLength) bytes but only \(file.count - 8) follow the length field (truncated file?)")
        }
        let headerBytes = UnsafeRawBufferPointer(rebasing: file[8..<(8 + headerLength)]).assumingMemoryBound(to: UInt8.self)
        let json: JSONValue
        do {
            json = try JSONValue.parse(headerBytes)
        } catch {
            if let duplicate = error.duplicateKey {
                throw SafeTensorsError(.duplicateTensor, file: path, tensor: duplicate, "the header names this tensor twice")
            }
            throw SafeTensorsError(.headerNotJSON, file: path, "the header is not valid JSON: \(error)")
        }
        guard let members = json.objectMembers else {
            throw SafeTensorsError(.headerNotObject, file: path, "the header is \(json.typeName); expected a JSON object")
        }
        let dataStart = 8 + headerLength
        let dataSize = file.count - dataStart
        var metadata: [(String, String)] = []
        var tensors: [TensorInfo] = []
        for (name, entry) in members {
            if name == "__metadata__" {
                guard let pairs = entry.objectMembers else {
                    throw SafeTensorsError(.invalidMetadata, file: path, "__metadata__ is \(entry.typeName); expected an object of strings")
                }
                for (key, value) in pairs {
                    guard let text = value.stringValue else {
                        throw SafeTensorsError(.invalidMetadata, file: path, "__metadata__ value of '\(key)' is \(value.typeName); expected a string")
                    }
                    metadata.append((key, text))
                }
                continue
            }
            tensors.append(try tensorInfo(name: name, entry: entry, file: path))
        }
        tensors.sort { ($0.begin, $0.end, $0.name) < ($1.begin, $1.end, $1.name) }
        var expectedBegin = 0
        for tensor in tensors {
            if tensor.end > dataSize {
                throw SafeTensorsError(.dataBeyondFile, file: path, tensor: tensor.name,
                                       "data ends at byte \(tensor.end) of the data area, which has only \(dataSize) bytes (truncated file or invalid offsets)")
            }
            if tensor.begin < expectedBegin {
                throw SafeTensorsError(.overlap, file: path, tensor: tensor.name,
                                       "data starts at byte \(tensor.begin), inside the previous tensor, which ends at \(expectedBegin)")
            }
            if tensor.begin > expectedBegin {
                throw SafeTensorsError(.gap, file: path, tensor: tensor.name,
                                       "data starts at byte \(tensor.begin); expected \(expectedBegin), contiguous with the previous tensor")
            }
            expectedBegin = tensor.end
        }
        if expectedBegin != dataSize {
            throw SafeTensorsError(.notCovered, file: path,
                                   "tensors cover \(expectedBegin) bytes of the data area but it has \(dataSize) (trailing bytes)")
        }
        return ParsedHeader(tensors: tensors, metadata: metadata, dataStart: dataStart)
    }

    private static func tensorInfo(name: String, entry: JSONValue, file path: String) throws(SafeTensorsError) -> TensorInfo {
        func bad(_ detail: String) -> SafeTensorsError { SafeTensorsError(.invalidTensorEntry, file: path, tensor: name, detail) }
        guard entry.objectMembers != nil else { throw bad("entry is \(entry.typeName); expected {\"dtype\", \"shape\", \"data_offsets\"}") }
        guard let dtypeName = entry["dtype"]?.stringValue else { throw bad("missing or non-string 'dtype'") }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw SafeTensorsError(.unknownDType, file: path, tensor: name,
                                   "unrecognized dtype '\(dtypeName)'; expected one of \(DType.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard let shapeItems = entry["shape"]?.arrayValue else { throw bad("missing or non-array 'shape'") }
        var shape: [Int] = []
        for item in shapeItems {
            guard let dimension = item.intValue, dimension >= 0 else { throw bad("shape \(JSONValue.array(shapeItems).compact) has an entry that is not a non-negative integer") }
            shape.append(dimension)
        }
        guard let offsets = entry["data_offsets"]?.arrayValue, offsets.count == 2,
              let begin = offsets[0].intValue, let end = offsets[1].intValue, begin >= 0, end >= begin else {
            throw bad("'data_offsets' must be [begin, end] with 0 <= begin <= end")
        }
        var count = 1
        for dimension in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: dimension)
            if overflow { throw SafeTensorsError(.sizeMismatch, file: path, tensor: name, "shape \(shape) overflows the element count") }
            count = product
        }
        let (bits, overflow) = count.multipliedReportingOverflow(by: dtype.bits)
        if overflow || bits % 8 != 0 {
            throw SafeTensorsError(.sizeMismatch, file: path, tensor: name, "shape \(shape) of \(dtype.rawValue) is not a whole number of bytes")
        }
        if bits / 8 != end - begin {
            throw SafeTensorsError(.sizeMismatch, file: path, tensor: name,
                                   "shape \(shape) of \(dtype.rawValue) needs \(bits / 8) bytes but data_offsets [\(begin), \(end)] hold \(end - begin)")
        }
        return TensorInfo(name: name, dtype: dtype, shape: shape, begin: begin, end: end)
    }
}

/// BF16 conversions: BF16 is the upper half of a Float32.
public enum BFloat16 {
    /// Exact widening.
    @inline(__always) public static func decode(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

    /// Round-to-nearest-even narrowing; NaN stays a (quiet) NaN with its sign
    /// instead of rounding up into infinity.
    @inline(__always) public static func encode(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let rounded = bits &+ 0x7FFF &+ ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }
}

/// What to write for one tensor.
public struct TensorToWrite: Sendable {
    /// The data: Float32 values converted to `dtype` on writing, bytes already
    /// in `dtype`, or a tensor of a mapped file copied as is (never loaded whole).
    public enum Payload: Sendable {
        case floats([Float])
        case raw([UInt8])
        case mapped(SafeTensorsFile, TensorInfo)
    }
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var payload: Payload

    public init(name: String, dtype: DType, shape: [Int], floats: [Float]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.payload = .floats(floats)
    }

    public init(name: String, dtype: DType, shape: [Int], raw: [UInt8]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.payload = .raw(raw)
    }

    /// A tensor copied unchanged from a mapped file.
    public init(copying tensor: TensorInfo, from file: SafeTensorsFile) {
        self.name = tensor.name
        self.dtype = tensor.dtype
        self.shape = tensor.shape
        self.payload = .mapped(file, tensor)
    }

    /// Bytes this tensor takes in the file.
    var byteCount: Int {
        switch payload {
        case .raw(let bytes): return bytes.count
        case .mapped(_, let info): return info.byteCount
        case .floats(let values): return values.count * dtype.bits / 8
        }
    }
}

/// Writes safetensors files the way the reference writer does: compact JSON
/// header padded with spaces to a multiple of 8, tensors sorted by alignment
/// then name, offsets contiguous from 0, all written atomically.
public enum SafeTensorsWriter {
    /// Checks the tensors and lays them out: the length field plus padded
    /// header, and the tensors in file order.
    static func plan(_ tensors: [TensorToWrite], metadata: [(String, String)], file: String) throws(SafeTensorsError) -> (prefix: [UInt8], ordered: [TensorToWrite]) {
        var seen = Set<String>()
        for tensor in tensors where !seen.insert(tensor.name).inserted || tensor.name == "__metadata__" {
            throw SafeTensorsError(.duplicateTensor, file: file, tensor: tensor.name, "two tensors with this name, or a reserved name")
        }
        let ordered = tensors.sorted { ($0.dtype.bits, $1.name) > ($1.dtype.bits, $0.name) }
        var members: [(String, JSONValue)] = []
        if !metadata.isEmpty {
            members.append(("__metadata__", .object(metadata.map { ($0.0, .string($0.1)) })))
        }
        var offset = 0
        for tensor in ordered {
            let count = tensor.shape.reduce(1, *)
            if tensor.byteCount * 8 != count * tensor.dtype.bits {
                throw SafeTensorsError(.sizeMismatch, file: file, tensor: tensor.name,
                                       "shape \(tensor.shape) of \(tensor.dtype.rawValue) needs \(count * tensor.dtype.bits / 8) bytes, got \(tensor.byteCount)")
            }
            if case .mapped(_, let info) = tensor.payload, info.dtype != tensor.dtype {
                throw SafeTensorsError(.unsupportedDType, file: file, tensor: tensor.name, "a copied tensor keeps its dtype \(info.dtype.rawValue)")
            }
            members.append((tensor.name, .object([
                ("dtype", .string(tensor.dtype.rawValue)),
                ("shape", .array(tensor.shape.map { .integer($0) })),
                ("data_offsets", .array([.integer(offset), .integer(offset + tensor.byteCount)])),
            ])))
            offset += tensor.byteCount
        }
        var header = Array(JSONValue.object(members).compact.utf8)
        while header.count % 8 != 0 { header.append(0x20) }
        var prefix: [UInt8] = []
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { prefix.append(contentsOf: $0) }
        return (prefix + header, ordered)
    }

    /// The encoded bytes of a whole file.
    public static func encode(_ tensors: [TensorToWrite], metadata: [(String, String)] = [], file: String = "<memory>") throws(SafeTensorsError) -> [UInt8] {
        let (prefix, ordered) = try plan(tensors, metadata: metadata, file: file)
        var out = prefix
        for tensor in ordered {
            try withBytes(of: tensor, file: file) { out.append(contentsOf: $0) }
        }
        return out
    }

    /// Writes a file atomically (temporary file in the same folder, fsync,
    /// rename), one tensor at a time, so copied tensors of a large mapped
    /// checkpoint are never held in memory.
    public static func write(_ tensors: [TensorToWrite], metadata: [(String, String)] = [], to path: String) throws {
        let (prefix, ordered) = try plan(tensors, metadata: metadata, file: path)
        try AtomicFile.write(to: path) { sink in
            try prefix.withUnsafeBytes { try sink($0) }
            for tensor in ordered {
                try withBytes(of: tensor, file: path) { try sink($0) }
            }
        }
    }

    /// Calls `body` with the little-endian bytes of a tensor in its dtype.
    static func withBytes(of tensor: TensorToWrite, file: String, _ body: (UnsafeRawBufferPointer) throws -> Void) throws(SafeTensorsError) {
        do {
            switch tensor.payload {
            case .raw(let raw):
                try raw.withUnsafeBytes(body)
            case .mapped(let source, let info):
                try body(source.rawBytes(info))
            case .floats(let values):
                let encoded = try encodeFloats(values, dtype: tensor.dtype, name: tensor.name, file: file)
                try encoded.withUnsafeBytes(body)
            }
        } catch let error as SafeTensorsError {
            throw error
        } catch {
            throw SafeTensorsError(.writeFailed, file: file, tensor: tensor.name, "\(error)")
        }
    }

    static func encodeFloats(_ values: [Float], dtype: DType, name: String, file: String) throws(SafeTensorsError) -> [UInt8] {
        // Whole-buffer conversions: this runs over every output value.
        func bytes<T>(_ converted: [T]) -> [UInt8] { converted.withUnsafeBytes { Array($0) } }
        switch dtype {
        case .f32:
            return bytes(values.map { $0.bitPattern.littleEndian })
        case .f64:
            return bytes(values.map { Double($0).bitPattern.littleEndian })
        case .bf16:
            return bytes(values.map { BFloat16.encode($0).littleEndian })
        case .f16:
            let halves = values.map { Float16($0) }
            if let index = halves.indices.first(where: { !halves[$0].isFinite && values[$0].isFinite }) {
                throw SafeTensorsError(.valueOutOfRange, file: file, tensor: name,
                                       "value \(values[index]) does not fit in F16 (largest is 65504); write F32 or BF16 instead (--dtype)")
            }
            return bytes(halves.map { $0.bitPattern.littleEndian })
        default:
            throw SafeTensorsError(.unsupportedDType, file: file, tensor: name,
                                   "cannot write floating-point values as \(dtype.rawValue); expected F32, F16, BF16 or F64")
        }
    }
}

/// Atomic file and folder replacement.
public enum AtomicFile {
    /// Writes bytes to a temporary file beside `path`, fsyncs it, renames it
    /// over `path`, and fsyncs the folder, so readers see the old file or the
    /// new one and a failure leaves no partial file.
    public static func write(_ bytes: [UInt8], to path: String) throws {
        try write(to: path) { sink in try bytes.withUnsafeBytes { try sink($0) } }
    }

    /// The same, with the content produced piece by piece: `body` calls its
    /// argument with each chunk in order.
    public static func write(to path: String, _ body: ((UnsafeRawBufferPointer) throws -> Void) throws -> Void) throws {
        let url = URL(fileURLWithPath: path)
        let folder = url.deletingLastPathComponent().path
        let temporary = folder + "/." + url.lastPathComponent + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SafeTensorsError(.writeFailed, file: path, "could not create a temporary file in '\(folder)': \(String(cString: strerror(errno)))") }
        var ok = false
        defer {
            if !ok { unlink(temporary) }
        }
        do {
            defer { close(fd) }
            try body { buffer in
                var written = 0
                while written < buffer.count {
                    let result = Glibc.write(fd, buffer.baseAddress! + written, buffer.count - written)
                    if result < 0 {
                        if errno == EINTR { continue }
                        throw SafeTensorsError(.writeFailed, file: path, "could not write: \(String(cString: strerror(errno)))")
                    }
                    written += result
                }
            }
            guard fsync(fd) == 0 else { throw SafeTensorsError(.writeFailed, file: path, "could not fsync: \(String(cString: strerror(errno)))") }
        }
        guard rename(temporary, path) == 0 else {
            throw SafeTensorsError(.writeFailed, file: path, "could not rename the temporary file into place: \(String(cString: strerror(errno)))")
        }
        ok = true
        syncFolder(folder)
    }

    /// Writes text atomically.
    public static func write(text: String, to path: String) throws {
        try write(Array(text.utf8), to: path)
    }

    /// fsyncs a folder so a rename in it is durable.
    public static func syncFolder(_ folder: String) {
        let fd = open(folder.isEmpty ? "." : folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 {
            fsync(fd)
            close(fd)
        }
    }
}
