import Foundation
import LoraAggCore

/// Adds a strategy's factored base-weight residual (U·V per module) to a
/// base checkpoint.
///
/// The residual file holds `<module>.U` [d_out, q] and `<module>.V` [q, d_in]
/// in F32; the base key of a module is `<module>.weight`. GPT-2 `Conv1D`
/// stores its weight as [in, out], so there (U·V)ᵀ is added.
public enum ResidualApplier {
    /// Why a residual could not be applied.
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var message: String
        public var description: String { message }
    }

    /// How to orient the residual for each base weight.
    public enum Orientation: String, Sendable, CaseIterable {
        /// From the residual file's `fan_in_fan_out` metadata, checked against the shapes.
        case auto
        /// The base weight is [out, in] (nn.Linear).
        case linear
        /// The base weight is [in, out] (GPT-2 Conv1D, fan_in_fan_out).
        case conv1d
    }

    /// Reads `base` and `residual`, writes `output` atomically; returns the modules changed.
    @discardableResult
    public static func apply(base basePath: String, residual residualPath: String, output: String,
                             orientation: Orientation = .auto, force: Bool = false) throws -> [String] {
        if AggregationJob.resolved(output) == AggregationJob.resolved(basePath) || AggregationJob.resolved(output) == AggregationJob.resolved(residualPath) {
            throw Failure(message: "output '\(output)' is one of the inputs; choose another --out")
        }
        if FileManager.default.fileExists(atPath: output) && !force {
            throw Failure(message: "output '\(output)' already exists; pass --force to replace it")
        }
        let base = try SafeTensorsFile(path: basePath)
        let residual = try SafeTensorsFile(path: residualPath)
        let fanInFanOut = residual.metadata.first { $0.0 == "fan_in_fan_out" }?.1 == "true"
        var modules: [String] = []
        for tensor in residual.tensors where tensor.name.hasSuffix(".U") {
            modules.append(String(tensor.name.dropLast(2)))
        }
        for tensor in residual.tensors where tensor.name.hasSuffix(".V") || tensor.name.hasSuffix(".U") {
            let module = String(tensor.name.dropLast(2))
            if residual.info(module + ".U") == nil || residual.info(module + ".V") == nil {
                throw Failure(message: "residual '\(residualPath)': module '\(module)' lacks its \(tensor.name.hasSuffix(".U") ? "V" : "U") factor")
            }
        }
        for tensor in residual.tensors where !tensor.name.hasSuffix(".V") && !tensor.name.hasSuffix(".U") {
            throw Failure(message: "residual '\(residualPath)': unrecognized tensor '\(tensor.name)'; expected '<module>.U' and '<module>.V'")
        }
        guard !modules.isEmpty else { throw Failure(message: "residual '\(residualPath)' holds no '<module>.U' / '<module>.V' pairs") }

        // Square weights cannot show their layout. PEFT flips fan_in_fan_out to
        // true on GPT-2 even when a config says false, so the non-square
        // modules of the same checkpoint, when they all agree, decide for the
        // square ones; the residual's metadata is the fallback.
        var shapeVotes = Set<Bool>()
        for module in modules {
            guard let u = residual.info(module + ".U"), let v = residual.info(module + ".V"),
                  u.shape.count == 2, v.shape.count == 2, let weight = base.info(module + ".weight") else { continue }
            let dOut = u.shape[0], dIn = v.shape[1]
            if dOut == dIn { continue }
            if weight.shape == [dOut, dIn] { shapeVotes.insert(false) }
            if weight.shape == [dIn, dOut] { shapeVotes.insert(true) }
        }
        let squareLayout = shapeVotes.count == 1 ? shapeVotes.first! : fanInFanOut

        var updated: [String: [Float]] = [:]
        for module in modules.sorted() {
            let uInfo = residual.info(module + ".U")!, vInfo = residual.info(module + ".V")!
            guard uInfo.shape.count == 2, vInfo.shape.count == 2, uInfo.shape[1] == vInfo.shape[0] else {
                throw Failure(message: "residual '\(residualPath)', module '\(module)': U \(uInfo.shape) and V \(vInfo.shape) do not multiply; expected [out, q] and [q, in]")
            }
            let dOut = uInfo.shape[0], q = uInfo.shape[1], dIn = vInfo.shape[1]
            let key = module + ".weight"
            guard let weight = base.info(key) else {
                throw Failure(message: "base '\(basePath)' has no tensor '\(key)' for residual module '\(module)'")
            }
            guard weight.dtype.isFloatConvertible, weight.shape.count == 2 else {
                throw Failure(message: "base '\(basePath)', tensor '\(key)': \(weight.dtype.rawValue) \(weight.shape) is not a floating-point matrix")
            }
            let linearFits = weight.shape == [dOut, dIn], convFits = weight.shape == [dIn, dOut]
            let transpose: Bool
            switch orientation {
            case .linear: transpose = false
            case .conv1d: transpose = true
            case .auto:
                if linearFits && convFits { transpose = squareLayout }
                else if linearFits { transpose = false }
                else if convFits { transpose = true }
                else { transpose = false }
            }
            guard transpose ? convFits : linearFits else {
                throw Failure(message: "base '\(basePath)', tensor '\(key)' is \(weight.shape) but the residual of '\(module)' is \(dOut)x\(dIn) (out x in); expected \(transpose ? [dIn, dOut] : [dOut, dIn])")
            }
            var values = try base.floats(weight).array
            let u = try residual.floats(uInfo), v = try residual.floats(vInfo)
            var product = [Float](repeating: 0, count: dOut * dIn)
            product.withUnsafeMutableBufferPointer { out in
                Kernels.gemm(u.pointer, v.pointer, out.baseAddress!, m: dOut, n: dIn, k: q)
            }
            if transpose {
                for i in 0..<dOut { for j in 0..<dIn { values[j * dOut + i] += product[i * dIn + j] } }
            } else {
                for index in 0..<values.count { values[index] += product[index] }
            }
            updated[key] = values
        }
        var tensors: [TensorToWrite] = []
        for tensor in base.tensors {
            if let values = updated[tensor.name] {
                tensors.append(TensorToWrite(name: tensor.name, dtype: tensor.dtype, shape: tensor.shape, floats: values))
            } else {
                tensors.append(TensorToWrite(copying: tensor, from: base))
            }
        }
        try SafeTensorsWriter.write(tensors, metadata: base.metadata, to: output)
        return modules.sorted()
    }
}
