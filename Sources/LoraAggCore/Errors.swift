/// Why an aggregation or a strategy's creation failed.
///
/// Each case maps one to one onto a status of the C ABI, so a message thrown
/// by a plugin reaches the user unchanged, with the same category.
public enum AggregationError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The round or a client is malformed (shapes, NaN/Inf, no clients, zero samples).
    case invalidInput(String)
    /// Valid input the strategy does not handle, such as heterogeneous ranks.
    case unsupported(String)
    /// The hyperparameters are invalid.
    case invalidConfig(String)
    /// Saved state could not be restored.
    case invalidState(String)
    /// The strategy failed for a reason of its own.
    case internalError(String)

    /// The message, without the category.
    public var message: String {
        switch self {
        case .invalidInput(let m), .unsupported(let m), .invalidConfig(let m),
             .invalidState(let m), .internalError(let m):
            return m
        }
    }

    public var description: String { message }
}
