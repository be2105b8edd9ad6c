import Synchronization

/// A dense, row-major Float32 matrix that owns its storage.
///
/// Results of an aggregation are `Matrix` values; client inputs are borrowed
/// ``MatrixView``s so that a round of LLaMA-sized adapters is never copied.
///
/// The values live either in a Swift array or in a ``MatrixStorage`` block
/// (`init(rows:cols:initializingWith:)`, or memory a plugin returned). A
/// storage block can cross the plugin boundary in both directions without a
/// copy, which matters for results as large as the input (a factored
/// residual). Both kinds behave the same: reading `values` of a
/// storage-backed matrix makes one array copy, cached; mutating it moves the
/// matrix to array storage first.
public struct Matrix: Sendable, Equatable {
    /// Number of rows.
    public let rows: Int
    /// Number of columns.
    public let cols: Int
    /// The values when `storage` is nil.
    private var array: [Float]
    /// The values, when they live outside a Swift array.
    private var storage: MatrixStorage?

    /// `rows * cols` values, row after row.
    public var values: [Float] {
        get { storage?.array ?? array }
        set {
            array = newValue
            storage = nil
        }
        _modify {
            if let storage {
                array = storage.array
                self.storage = nil
            }
            yield &array
        }
    }

    /// Creates a matrix from row-major values; `values.count` must be `rows * cols`.
    public init(rows: Int, cols: Int, values: [Float]) {
        precondition(rows >= 0 && cols >= 0 && values.count == rows * cols,
                     "Matrix \(rows)x\(cols) needs \(rows * cols) values, got \(values.count)")
        self.rows = rows
        self.cols = cols
        self.array = values
        self.storage = nil
    }

    /// Creates a matrix whose values `body` writes into fresh storage, which
    /// can later be handed across the plugin boundary without a copy.
    ///
    /// Like `Array(unsafeUninitializedCapacity:initializingWith:)`, the
    /// buffer starts uninitialised: `body` must write all `rows * cols`
    /// entries (skipping the zero fill saves a pass over large results).
    public init(rows: Int, cols: Int, initializingWith body: (UnsafeMutableBufferPointer<Float>) throws -> Void) rethrows {
        precondition(rows >= 0 && cols >= 0, "Matrix \(rows)x\(cols) has a negative dimension")
        let storage = MatrixStorage(uninitializedCount: rows * cols)
        try body(UnsafeMutableBufferPointer(start: storage.base, count: rows * cols))
        self.init(rows: rows, cols: cols, storage: storage)
    }

    /// A matrix over existing storage of exactly `rows * cols` values.
    package init(rows: Int, cols: Int, storage: MatrixStorage) {
        precondition(rows >= 0 && cols >= 0 && storage.count == rows * cols,
                     "Matrix \(rows)x\(cols) needs \(rows * cols) values, got storage of \(storage.count)")
        self.rows = rows
        self.cols = cols
        self.array = []
        self.storage = storage
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

    /// The storage block holding the values, if they are not in a Swift array
    /// (the plugin kit hands it over instead of copying).
    package var sharedStorage: MatrixStorage? { storage }

    /// The entry at `row`, `column`.
    public subscript(row: Int, column: Int) -> Float {
        get {
            if let storage {
                precondition(row >= 0 && row < rows && column >= 0 && column < cols, "Matrix index (\(row), \(column)) out of range \(rows)x\(cols)")
                return storage.base[row * cols + column]
            }
            return array[row * cols + column]
        }
        set { values[row * cols + column] = newValue }
    }

    /// Calls `body` with the values, read-only, without copying them.
    public func withUnsafeBufferPointer<R>(_ body: (UnsafeBufferPointer<Float>) throws -> R) rethrows -> R {
        if let storage {
            return try withExtendedLifetime(storage) {
                try body(UnsafeBufferPointer(start: storage.base, count: rows * cols))
            }
        }
        return try array.withUnsafeBufferPointer(body)
    }

    /// Calls `body` with the values, writable in place (storage shared with
    /// another matrix or borrowed from a plugin is copied first).
    public mutating func withUnsafeMutableBufferPointer<R>(_ body: (UnsafeMutableBufferPointer<Float>) throws -> R) rethrows -> R {
        if storage != nil {
            if !isKnownUniquelyReferenced(&storage) || !storage!.isOwned {
                let copy = MatrixStorage(uninitializedCount: rows * cols)
                copy.base.initialize(from: storage!.base, count: rows * cols)
                storage = copy
            }
            let storage = storage!
            storage.invalidateCache()
            return try withExtendedLifetime(storage) {
                try body(UnsafeMutableBufferPointer(start: storage.base, count: rows * cols))
            }
        }
        return try array.withUnsafeMutableBufferPointer { try body($0) }
    }

    /// Calls `body` with a read-only view of this matrix.
    public func withView<R>(_ body: (MatrixView) throws -> R) rethrows -> R {
        try withUnsafeBufferPointer { buffer in
            try body(MatrixView(rows: rows, cols: cols, base: buffer.baseAddress ?? MatrixView.emptyBase))
        }
    }

    /// Whether every entry is finite.
    public var isFinite: Bool { withUnsafeBufferPointer(Kernels.allFinite) }

    /// Equal shapes and equal values, whatever holds them.
    public static func == (lhs: Matrix, rhs: Matrix) -> Bool {
        guard lhs.rows == rhs.rows, lhs.cols == rhs.cols else { return false }
        return lhs.withUnsafeBufferPointer { l in rhs.withUnsafeBufferPointer { r in l.elementsEqual(r) } }
    }
}

/// A heap block of Float values behind a ``Matrix``: either allocated here,
/// or memory a plugin returned, kept valid by `owner` (which frees it when
/// the last matrix over it is gone).
///
/// Its values never change after the matrix that created it is built,
/// except through a uniquely referenced matrix's
/// `withUnsafeMutableBufferPointer`, so sharing it across threads is safe.
public final class MatrixStorage: @unchecked Sendable {
    /// First value; `count` follow.
    package let base: UnsafeMutablePointer<Float>
    /// Number of values.
    package let count: Int
    /// What keeps borrowed memory valid; nil when this block allocated it.
    private let owner: AnyObject?
    /// An array copy of the values, made the first time `Matrix.values` is read.
    private let cache = Mutex<[Float]?>(nil)

    /// Allocates `count` uninitialised values.
    package init(uninitializedCount count: Int) {
        base = UnsafeMutablePointer<Float>.allocate(capacity: max(1, count))
        self.count = count
        owner = nil
    }

    /// Borrows `count` values at `base`, valid as long as `owner` lives.
    package init(borrowing base: UnsafeMutablePointer<Float>, count: Int, owner: AnyObject) {
        self.base = base
        self.count = count
        self.owner = owner
    }

    /// Whether this block allocated its memory (and may be written in place).
    package var isOwned: Bool { owner == nil }

    /// The values as an array, copied once.
    var array: [Float] {
        cache.withLock { cached in
            if let cached { return cached }
            let copy = Array(UnsafeBufferPointer(start: base, count: count))
            cached = copy
            return copy
        }
    }

    func invalidateCache() { cache.withLock { $0 = nil } }

    deinit { if owner == nil { base.deallocate() } }
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
