// libFuzzer entry for the safetensors reader. Build and run (see docs/formats.md):
//   scripts/fuzz-safetensors.sh [seconds]
// Every input must be refused with an error or accepted; a crash, hang or
// sanitizer report is a bug, and each one found becomes a test in
// Tests/LoraAggTests/FormatsSafeTensorsTests.swift.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSafeTensors(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let buffer = UnsafeRawBufferPointer(start: data, count: size)
    if let parsed = try? SafeTensorsFile.parseHeader(buffer, file: "fuzz") {
        // Touch every accepted tensor's bytes, as a reader would.
        var checksum: UInt8 = 0
        for tensor in parsed.tensors {
            for byte in UnsafeRawBufferPointer(rebasing: buffer[(parsed.dataStart + tensor.begin)..<(parsed.dataStart + tensor.end)]) { checksum &+= byte }
        }
        _ = checksum
    }
    _ = try? JSONValue.parse(UnsafeBufferPointer(start: data, count: size))
    return 0
}
