/// The one place where the suite's numerical tolerances are stated.
///
/// Plugins compute in Float32 and the suite compares against Double
/// references (``Reference``), so equality is "to round-off": the Frobenius
/// norm of the difference, relative to the Frobenius norm of the expected
/// update. The inputs are random factors of order 0.1–1, so a relative bound is
/// a bound relative to the input's scale.
public enum Tolerance {
    /// Relative error allowed between a Float32 result and its Double
    /// reference: about 80 ulps of Float32 (ε = 1.19e-7), room for the
    /// round-off of a few weighted sums and one factorisation (QR/SVD) on the
    /// suite's small shapes, and still five orders of magnitude below the
    /// aggregation bias of factor averaging (≈ 0.1–0.5 on these inputs).
    public static let relative = 1e-5

    /// Checks marked bit-identical (determinism, inputs not mutated) allow no
    /// difference at all: they compare bit patterns.
    public static let bitIdentical = 0.0
}
