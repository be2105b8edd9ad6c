@_exported import CLoraAggABI
import LoraAggCore

/// The one mapping between Swift errors and the C ABI's statuses and error
/// buffers, shared by both sides of the boundary: the plugin kit (Swift errors
/// out to C) and the host (C statuses back to Swift errors, and the host
/// services' own failures).
extension AggregationError {
    /// The ABI status of this error's category.
    public var status: lora_agg_status {
        switch self {
        case .invalidInput: return LORA_AGG_INVALID_INPUT
        case .unsupported: return LORA_AGG_UNSUPPORTED
        case .invalidConfig: return LORA_AGG_INVALID_CONFIG
        case .invalidState: return LORA_AGG_INVALID_STATE
        case .internalError: return LORA_AGG_INTERNAL_ERROR
        }
    }

    /// The error a failing status and its message stand for.
    public init(status: lora_agg_status, message: String) {
        switch status {
        case LORA_AGG_INVALID_INPUT: self = .invalidInput(message)
        case LORA_AGG_UNSUPPORTED: self = .unsupported(message)
        case LORA_AGG_INVALID_CONFIG: self = .invalidConfig(message)
        case LORA_AGG_INVALID_STATE: self = .invalidState(message)
        default: self = .internalError(message)
        }
    }

    /// Any thrown error as an ``AggregationError`` (foreign errors are internal).
    public static func from(_ error: Error) -> AggregationError {
        error as? AggregationError ?? .internalError("\(error)")
    }
}

/// Writes `message` into a caller's error buffer as NUL-terminated UTF-8,
/// truncated on a character boundary to fit `capacity` bytes.
public func writeErrorMessage(_ message: String, to buffer: UnsafeMutablePointer<CChar>?, capacity: Int) {
    guard let buffer, capacity > 0 else { return }
    var bytes = Array(message.utf8)
    if bytes.count >= capacity {
        bytes = Array(bytes.prefix(capacity - 1))
        // Drop a trailing partial multi-byte character.
        while let last = bytes.last, last & 0xC0 == 0x80 { bytes.removeLast() }
        if let last = bytes.last, last & 0x80 != 0 { bytes.removeLast() }
    }
    bytes.withUnsafeBufferPointer { source in
        buffer.withMemoryRebound(to: UInt8.self, capacity: capacity) { target in
            if let base = source.baseAddress { target.update(from: base, count: source.count) }
            target[source.count] = 0
        }
    }
}

/// Reports a thrown error through the ABI: writes its message and returns its status.
public func reportError(_ error: Error, to buffer: UnsafeMutablePointer<CChar>?, capacity: Int) -> lora_agg_status {
    let error = AggregationError.from(error)
    writeErrorMessage(error.message, to: buffer, capacity: capacity)
    return error.status
}
