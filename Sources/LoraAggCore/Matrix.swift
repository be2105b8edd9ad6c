/// A dense, row-major Float32 matrix that owns its storage.
///
/// Results of an aggregation are `Matrix` values; client inputs are borrowed
/// ``MatrixView``s so that a round of LLaMA-sized adapters is never copied.
public struct Matrix: Sendable, Equatable {
    /// Number of rows.
    public let rows: Int
    /// Number of columns.
    public let cols: Int
    /// `rows * cols` values, row after row.
    public var values: [Float]

    /// Creates a matrix from row-major values; `values.count` must be `rows * cols`.
    public init(rows: Int, cols: Int, values: [Float]) {
        precondition(rows >= 0 && cols >= 0 && values.count == rows * cols,
                     "Matrix \(rows)x\(cols) needs \(rows * cols) values, got \(values.count)")
        self.rows = rows
        self.cols = cols
        self.values = values
    }

    /// A matrix of zeros.
    public init(zeros rows: Int, _ cols: Int) {
        self.init(rows: rows, cols: cols, values: [Float](repeating: 0, count: rows * cols))
    }

    /// A matrix whose entries are `entry(row, column)`.
    public init(rows: Int, cols: Int, entry: (Int, Int) -> Float) {
        var values = [Float]()
        values.reserveCapacity(rows * cols)
        for i in 0..<rows { for j in 0..<cols { values.append(entry(i, j)) } }
        self.init(rows: rows, cols: cols, values: values)
    }

    /// The entry at `row`, `column`.
    public subscript(row: Int, column: Int) -> Float {
        get { values[row * cols + column] }
        set { values[row * cols + column] = newValue }
    }

    /// Calls `body` with a read-only view of this matrix.
    public func withView<R>(_ body: (MatrixView) throws -> R) rethrows -> R {
        try values.withUnsafeBufferPointer { buffer in
            try body(MatrixView(rows: rows, cols: cols, base: buffer.baseAddress ?? MatrixView.emptyBase))
        }
    }

    /// Whether every entry is finite.
    public var isFinite: Bool { values.withUnsafeBufferPointer(Kernels.allFinite) }
}

/// A read-only, borrowed, row-major Float32 matrix.
///
/// Views point into memory the caller owns (a plugin call's arguments or a
/// memory-mapped file) and are valid only as long as that memory is.
public struct MatrixView: @unchecked Sendable {
    /// Number of rows.
    public let rows: Int
    /// Number of columns.
    public let cols: Int
    /// First entry; `rows * cols` values follow, row after row.
    public let base: UnsafePointer<Float>

    /// Creates a view of `rows * cols` values starting at `base`.
    public init(rows: Int, cols: Int, base: UnsafePointer<Float>) {
        self.rows = rows
        self.cols = cols
        self.base = base
    }

    /// Number of entries.
    public var count: Int { rows &* cols }

    /// The entry at `row`, `column`.
    @inlinable public subscript(row: Int, column: Int) -> Float {
        base[row &* cols &+ column]
    }

    /// The entries as a buffer.
    public var buffer: UnsafeBufferPointer<Float> { UnsafeBufferPointer(start: base, count: count) }

    /// An owned copy.
    public func copy() -> Matrix { Matrix(rows: rows, cols: cols, values: Array(buffer)) }

    /// Whether every entry is finite.
    public var isFinite: Bool { Kernels.allFinite(buffer) }

    /// Storage for views of empty matrices, which need a valid pointer.
    nonisolated(unsafe) public static let emptyBase: UnsafePointer<Float> = {
        let pointer = UnsafeMutablePointer<Float>.allocate(capacity: 1)
        pointer.initialize(to: 0)
        return UnsafePointer(pointer)
    }()
}
