import LoraAggCore

/// Small dense Double linear algebra for computing expected values in tests,
/// independently of the plugins (row-major, naive loops, small shapes only).
struct Dense: Equatable {
    var rows: Int
    var cols: Int
    var values: [Double]

    init(rows: Int, cols: Int, values: [Double]) {
        precondition(values.count == rows * cols)
        self.rows = rows
        self.cols = cols
        self.values = values
    }

    init(zeros rows: Int, _ cols: Int) { self.init(rows: rows, cols: cols, values: .init(repeating: 0, count: rows * cols)) }

    init(_ matrix: Matrix) { self.init(rows: matrix.rows, cols: matrix.cols, values: matrix.values.map(Double.init)) }

    static func identity(_ n: Int) -> Dense {
        var result = Dense(zeros: n, n)
        for i in 0..<n { result[i, i] = 1 }
        return result
    }

    subscript(i: Int, j: Int) -> Double {
        get { values[i * cols + j] }
        set { values[i * cols + j] = newValue }
    }

    var transposed: Dense {
        var result = Dense(zeros: cols, rows)
        for i in 0..<rows { for j in 0..<cols { result[j, i] = self[i, j] } }
        return result
    }

    var norm: Double { values.reduce(0) { $0 + $1 * $1 }.squareRoot() }

    static func * (x: Dense, y: Dense) -> Dense {
        precondition(x.cols == y.rows)
        var result = Dense(zeros: x.rows, y.cols)
        for i in 0..<x.rows { for t in 0..<x.cols { for j in 0..<y.cols { result[i, j] += x[i, t] * y[t, j] } } }
        return result
    }

    static func * (w: Double, x: Dense) -> Dense { Dense(rows: x.rows, cols: x.cols, values: x.values.map { w * $0 }) }

    static func + (x: Dense, y: Dense) -> Dense {
        precondition(x.rows == y.rows && x.cols == y.cols)
        return Dense(rows: x.rows, cols: x.cols, values: zip(x.values, y.values).map { $0 + $1 })
    }

    static func - (x: Dense, y: Dense) -> Dense { x + (-1) * y }

    /// X·M⁻¹ for a square invertible M, by Gauss–Jordan elimination with partial pivoting.
    func rightDivided(by m: Dense) -> Dense {
        // Solve Mᵀ Xᵀ = selfᵀ.
        let n = m.rows
        var a = m.transposed, b = transposed
        for column in 0..<n {
            let pivot = (column..<n).max { abs(a[$0, column]) < abs(a[$1, column]) }!
            if pivot != column {
                for j in 0..<n { (a[column, j], a[pivot, j]) = (a[pivot, j], a[column, j]) }
                for j in 0..<b.cols { (b[column, j], b[pivot, j]) = (b[pivot, j], b[column, j]) }
            }
            let d = a[column, column]
            for j in 0..<n { a[column, j] /= d }
            for j in 0..<b.cols { b[column, j] /= d }
            for i in 0..<n where i != column {
                let f = a[i, column]
                if f == 0 { continue }
                for j in 0..<n { a[i, j] -= f * a[column, j] }
                for j in 0..<b.cols { b[i, j] -= f * b[column, j] }
            }
        }
        return b.transposed
    }

    /// The largest absolute entry difference.
    func maxDifference(_ other: Dense) -> Double { zip(values, other.values).map { abs($0 - $1) }.max() ?? 0 }
}
