import Foundation
import LoraAggCore

/// What a check body gets: the subject, its declared capabilities, and
/// helpers that build inputs, run fresh instances and compare updates.
struct CheckContext: Sendable {
    let subject: ConformanceSubject
    let id: String

    var capabilities: Capabilities { subject.info.capabilities }
    var inputs: InputFactory {
        InputFactory(sharedA: capabilities.contains(.requiresSharedA),
                     heterogeneous: capabilities.contains(.heterogeneousRanks))
    }

    func result(_ outcome: CheckOutcome, measured: Double? = nil, measure: String? = nil,
                tolerance: Double? = nil, _ detail: String = "") -> CheckResult {
        CheckResult(id: id, outcome: outcome, measured: measured, measure: measure, tolerance: tolerance, detail: detail)
    }

    /// Passes when `error` ≤ ``Tolerance/relative``.
    func withinTolerance(_ error: Double, where location: String) -> CheckResult {
        if error <= Tolerance.relative {
            return result(.pass, measured: error, measure: "relative error", tolerance: Tolerance.relative)
        }
        return result(.fail, measured: error, measure: "relative error", tolerance: Tolerance.relative,
                      "relative error \(formatNumber(error)) exceeds \(formatNumber(Tolerance.relative)) (\(location))")
    }

    /// Aggregates owned clients on a fresh instance, through the host's validation.
    func aggregate(_ clients: [ClientUpdate], dOut: Int, dIn: Int, module: String) throws -> AggregationResult {
        let aggregator = try subject.makeAggregator()
        return try ModuleRound.withRound(module: module, dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    /// Aggregates on a fresh instance without the host's validation.
    func aggregateUnvalidated(_ clients: [ClientUpdate], dOut: Int, dIn: Int, module: String) throws -> AggregationResult {
        try ModuleRound.withRound(module: module, dOut: dOut, dIn: dIn, clients: clients) { try subject.aggregateUnvalidated($0) }
    }

    /// Expects `body` to throw an ``AggregationError`` of an allowed category.
    func expectRefusal(_ what: String, allowed: [String] = ["invalid input"],
                       _ body: () throws -> AggregationResult) -> CheckResult {
        do {
            let accepted = try body()
            return result(.fail, "accepted \(what) and returned a result of rank \(accepted.rank)\(accepted.isFinite ? "" : " holding NaN or Inf"); expected an error")
        } catch let error as AggregationError {
            let category = ConformanceSuite.category(error)
            if allowed.contains(category) { return result(.pass, ConformanceSuite.describe(error)) }
            return result(.fail, "refused \(what) as '\(category)'; expected '\(allowed.joined(separator: "' or '"))': \(error.message)")
        } catch {
            return result(.fail, "refused \(what) with an unexpected error: \(error)")
        }
    }
}

/// The updates a result applies, as dense Double matrices (small shapes only).
///
/// Factors are not unique (an SVD or a stack can factor one update many
/// ways), so checks compare these updates, never raw factors.
struct Observation {
    /// s·B·A + U·V.
    var global: [Double]
    /// Per client, U·V + s_k'·B_k'·A_k' of its payload; nil without payloads.
    var clients: [[Double]]?

    init(_ result: AggregationResult, dOut: Int, dIn: Int, ranks: [Int]) {
        global = Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn)
        guard let payloads = result.clientPayloads, !payloads.isEmpty else { return }
        clients = payloads.indices.map { k in
            Reference.receivedUpdate(result, client: k, rank: k < ranks.count ? ranks[k] : 0, dOut: dOut, dIn: dIn)
        }
    }

    /// The largest relative difference between this and `other`, where client
    /// i here corresponds to client `mapping[i]` there; with where it occurred.
    func difference(to other: Observation, mapping: [Int]) -> (error: Double, location: String) {
        var worst = (Reference.relativeError(global, other.global), "global update s·B·A + U·V")
        switch (clients, other.clients) {
        case (nil, nil):
            break
        case let (mine?, theirs?):
            for (i, j) in mapping.enumerated() where i < mine.count && j < theirs.count {
                let error = Reference.relativeError(mine[i], theirs[j])
                if error > worst.0 { worst = (error, "update of client \(i), from its payload") }
            }
        default:
            return (.infinity, "one result has per-client payloads and the other has none")
        }
        return worst
    }
}

/// Bit-level equality of two results (diagnostics excluded: they may hold timings).
func differingValues(_ x: AggregationResult, _ y: AggregationResult) -> Int {
    func count(_ a: Matrix, _ b: Matrix) -> Int {
        guard a.rows == b.rows, a.cols == b.cols else { return max(a.values.count, b.values.count, 1) }
        return zip(a.values, b.values).filter { $0.bitPattern != $1.bitPattern }.count
    }
    var total = count(x.a, y.a) + count(x.b, y.b) + (x.scaling.bitPattern == y.scaling.bitPattern ? 0 : 1)
    switch (x.residual, y.residual) {
    case (nil, nil): break
    case let (r?, s?): total += count(r.u, s.u) + count(r.v, s.v)
    default: total += 1
    }
    switch (x.clientPayloads, y.clientPayloads) {
    case (nil, nil): break
    case let (p?, q?) where p.count == q.count:
        for (a, b) in zip(p, q) {
            total += count(a.a, b.a) + count(a.b, b.b) + (a.scaling.bitPattern == b.scaling.bitPattern ? 0 : 1)
        }
    default: total += 1
    }
    return total
}

/// The table of checks. Adding a check is adding a row here and a paragraph
/// in docs/conformance.md.
enum Checks {
    static let all: [ConformanceCheck] = [
        ConformanceCheck(
            id: ConformanceSuite.loadCheckID,
            expectation: "The plugin loads; its name is kebab-case, its version semver, its summary one line of at most 150 characters, its citation non-empty, and its parameter schema valid with defaults in range.",
            body: loadAndMetadata),
        ConformanceCheck(
            id: "single-client-unchanged",
            expectation: "A round of one client returns that client's update s·B·A unchanged.",
            body: singleClient),
        ConformanceCheck(
            id: "identical-clients-return-that-client",
            expectation: "Several identical clients with different sample counts give that client's update back.",
            body: identicalClients),
        ConformanceCheck(
            id: "client-order-irrelevant",
            expectation: "Permuting the clients changes neither the global update nor any client's update.",
            body: clientOrder),
        ConformanceCheck(
            id: "duplicate-client-equals-double-samples",
            expectation: "A client given twice gives the same update as that client once with twice its samples.",
            body: duplicateClient),
        ConformanceCheck(
            id: "sample-weights-renormalized",
            expectation: "Multiplying every client's sample count by one constant changes nothing: weights are n_k over the clients present.",
            body: renormalized),
        ConformanceCheck(
            id: "output-shapes-consistent-and-finite",
            expectation: "The result's factors, residual and payloads have shapes consistent with the module and ranks, and are finite.",
            body: shapesAndFinite),
        ConformanceCheck(
            id: "deterministic",
            expectation: "The same round gives bit-identical results, on one instance and on two.",
            body: deterministic),
        ConformanceCheck(
            id: "inputs-not-mutated",
            expectation: "Aggregation leaves every byte of the clients' A and B unchanged.",
            body: inputsNotMutated),
        ConformanceCheck(
            id: "concurrent-calls-agree",
            expectation: "Calls for different modules from several threads at once agree with the same calls made one at a time.",
            body: concurrentCalls),
        ConformanceCheck(
            id: "state-round-trips",
            expectation: "A plugin declaring 'stateful' saves its state after a round, and a fresh instance that loads it aggregates the next round bit-identically to the original instance.",
            body: stateRoundTrip),
        ConformanceCheck(
            id: "exact-update",
            expectation: "A plugin declaring 'exact' reproduces Σ p_k s_k B_k A_k (checked densely in Double) with mixed scalings, and mixed ranks if it accepts them.",
            body: exactUpdate),
        ConformanceCheck(
            id: "heterogeneous-ranks-refused",
            expectation: "A plugin not declaring 'heterogeneous-ranks' refuses clients of different ranks with an error.",
            body: heterogeneousRefused),
        ConformanceCheck(
            id: "heterogeneous-ranks-accepted",
            expectation: "A plugin declaring 'heterogeneous-ranks' aggregates clients of ranks 2, 5 and 3 into a consistent, finite result.",
            body: heterogeneousAccepted),
        ConformanceCheck(
            id: "no-clients-refused",
            expectation: "The plugin itself refuses a round without clients with an invalid-input error.",
            body: noClients),
        ConformanceCheck(
            id: "zero-total-samples-refused",
            expectation: "The plugin itself refuses a round whose clients have zero samples in total with an invalid-input error.",
            body: zeroSamples),
        ConformanceCheck(
            id: "mismatched-shapes-refused",
            expectation: "Factors whose shapes disagree with the module or with each other are refused with an invalid-input error.",
            body: mismatchedShapes),
        ConformanceCheck(
            id: "rank-zero-refused",
            expectation: "The plugin itself refuses clients of rank 0 with an invalid-input error.",
            body: rankZero),
        ConformanceCheck(
            id: "nan-in-a-refused",
            expectation: "A NaN in a client's A is refused with an invalid-input error.",
            body: { try nonFinite($0, value: .nan, inA: true) }),
        ConformanceCheck(
            id: "nan-in-b-refused",
            expectation: "A NaN in a client's B is refused with an invalid-input error.",
            body: { try nonFinite($0, value: .nan, inA: false) }),
        ConformanceCheck(
            id: "inf-in-a-refused",
            expectation: "An infinity in a client's A is refused with an invalid-input error.",
            body: { try nonFinite($0, value: .infinity, inA: true) }),
        ConformanceCheck(
            id: "inf-in-b-refused",
            expectation: "An infinity in a client's B is refused with an invalid-input error.",
            body: { try nonFinite($0, value: -.infinity, inA: false) }),
    ]

    // Shapes: non-square, in both orientations.
    static let dOut = 12, dIn = 9

    static func loadAndMetadata(_ c: CheckContext) throws -> CheckResult {
        let info = c.subject.info
        let problems = info.problems
        if !problems.isEmpty { return c.result(.fail, problems.joined(separator: "; ")) }
        do {
            _ = try c.subject.makeAggregator()
        } catch {
            return c.result(.fail, "could not create an instance with default hyperparameters: \(ConformanceSuite.describe(error))")
        }
        let capabilities = info.capabilities.names.isEmpty ? "none" : info.capabilities.names.joined(separator: ", ")
        return c.result(.pass, "\(info.name) \(info.version); \(info.parameters.count) hyperparameter(s); capabilities: \(capabilities)")
    }

    static func singleClient(_ c: CheckContext) throws -> CheckResult {
        // rsLoRA scaling 16/√3 ≠ 1 and a wide module (d_in > d_out).
        let clients = c.inputs.clients([.init(rank: 3, alpha: 16, rsLoRA: true, samples: 12)], dOut: 5, dIn: 8, seed: 1)
        let result = try c.aggregate(clients, dOut: 5, dIn: 8, module: "conformance.single")
        let expected = clientUpdate(clients[0], dOut: 5, dIn: 8)
        return c.compare(Observation(result, dOut: 5, dIn: 8, ranks: [3]), toEvery: expected)
    }

    static func identicalClients(_ c: CheckContext) throws -> CheckResult {
        let one = c.inputs.clients([.init(rank: 3, alpha: 8, rsLoRA: false, samples: 1)], dOut: dOut, dIn: dIn, seed: 2)[0]
        let clients = [5.0, 10, 25].enumerated().map { k, samples in
            ClientUpdate(id: "client-\(k)", samples: samples, scaling: one.scaling, a: one.a, b: one.b)
        }
        let result = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.identical")
        return c.compare(Observation(result, dOut: dOut, dIn: dIn, ranks: [3, 3, 3]),
                         toEvery: clientUpdate(one, dOut: dOut, dIn: dIn))
    }

    static func clientOrder(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 3)
        let original = try c.observe(clients, module: "conformance.order")
        var worst = (error: 0.0, location: "")
        // A rotation too: reversal commutes with some permutations, so payloads
        // handed out in reverse order could pass a single unlucky permutation.
        for order in [[2, 0, 3, 1], [1, 2, 3, 0]] {
            let permuted = order.map { clients[$0] }
            let observed = try c.observe(permuted, module: "conformance.order")
            // Client k of the original round sits at position order.firstIndex(of: k).
            let mapping = clients.indices.map { k in order.firstIndex(of: k)! }
            let difference = original.difference(to: observed, mapping: mapping)
            if difference.error >= worst.error { worst = difference }
        }
        return c.withinTolerance(worst.error, where: worst.location)
    }

    static func duplicateClient(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 4)
        var copy = clients[1]
        copy.id = "client-1-copy"
        var doubled = clients
        doubled[1].samples *= 2
        let twice = try c.observe(clients + [copy], module: "conformance.duplicate")
        let once = try c.observe(doubled, module: "conformance.duplicate")
        let difference = twice.difference(to: once, mapping: [0, 1, 2, 3, 1])
        return c.withinTolerance(difference.error, where: difference.location)
    }

    static func renormalized(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 5)
        let original = try c.observe(clients, module: "conformance.weights")
        var worst = (error: 0.0, location: "")
        for factor in [1000.0, 1.0 / 64] {
            let scaled = clients.map { client -> ClientUpdate in
                var client = client
                client.samples *= factor
                return client
            }
            let difference = original.difference(to: try c.observe(scaled, module: "conformance.weights"),
                                                  mapping: Array(clients.indices))
            if difference.error >= worst.error { worst = (difference.error, "samples × \(formatNumber(factor)): \(difference.location)") }
        }
        return c.withinTolerance(worst.error, where: worst.location)
    }

    static func shapesAndFinite(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 6)
        let ranks = clients.map(\.rank)
        let result = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.shapes")
        var problems = result.shapeProblems(dOut: dOut, dIn: dIn, clientRanks: ranks)
        if !result.isFinite { problems.append("the result holds NaN or Inf") }
        if result.clientPayloads == nil, let largest = ranks.max(), result.rank < largest {
            problems.append("global rank \(result.rank) is below client rank \(largest), so that client cannot take its first \(largest) slots; return per-client payloads instead")
        }
        for (k, payload) in (result.clientPayloads ?? []).enumerated() where !(payload.scaling > 0) {
            problems.append("payload \(k) has scaling \(payload.scaling); expected > 0")
        }
        if let residual = result.residual, residual.rank == 0 { problems.append("residual of rank 0 should be omitted") }
        if problems.isEmpty {
            return c.result(.pass, measured: Double(result.rank), measure: "global rank",
                            "client ranks \(ranks.map(String.init).joined(separator: ", "))")
        }
        return c.result(.fail, measured: Double(result.rank), measure: "global rank", problems.joined(separator: "; "))
    }

    static func deterministic(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 7)
        let first = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.determinism")
        let second = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.determinism")
        var differing = differingValues(first, second)
        var location = "two fresh instances"
        // A stateful strategy may legitimately change on a second call to the same instance.
        if differing == 0 && !c.capabilities.contains(.stateful) {
            let aggregator = try c.subject.makeAggregator()
            let results = try (0..<2).map { _ in
                try ModuleRound.withRound(module: "conformance.determinism", dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
            }
            differing = differingValues(results[0], results[1])
            location = "one instance called twice"
        }
        if differing == 0 { return c.result(.pass, measured: 0, measure: "differing values", tolerance: 0) }
        return c.result(.fail, measured: Double(differing), measure: "differing values", tolerance: 0,
                        "\(differing) value(s) differ between two runs on the same round (\(location))")
    }

    static func stateRoundTrip(_ c: CheckContext) throws -> CheckResult {
        guard c.capabilities.contains(.stateful) else { return c.result(.skip, "capability 'stateful' not declared") }
        let first = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 20)
        let next = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 21)
        func run(_ aggregator: any Aggregator, _ clients: [ClientUpdate], round: Int) throws -> AggregationResult {
            try ModuleRound.withRound(module: "conformance.state", dOut: dOut, dIn: dIn, roundIndex: round, clients: clients) {
                try aggregator.aggregate($0)
            }
        }
        let original = try c.subject.makeAggregator()
        _ = try run(original, first, round: 0)
        guard let saved = try original.saveState() else {
            return c.result(.fail, "declares 'stateful' but saved no state")
        }
        let restored = try c.subject.makeAggregator()
        try restored.loadState(saved)
        let differing = differingValues(try run(original, next, round: 1), try run(restored, next, round: 1))
        if differing == 0 {
            return c.result(.pass, measured: 0, measure: "differing values", tolerance: 0, "\(saved.count) bytes of state")
        }
        return c.result(.fail, measured: Double(differing), measure: "differing values", tolerance: 0,
                        "\(differing) value(s) differ between the original instance and one restored from its \(saved.count) bytes of state")
    }

    static func inputsNotMutated(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 8)
        // Copies of the bits: the arrays themselves share storage with `clients`.
        let before = clients.map { ($0.a.values.map(\.bitPattern), $0.b.values.map(\.bitPattern)) }
        _ = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.mutation")
        var changed: [String] = []
        var count = 0
        for (k, client) in clients.enumerated() {
            let a = zip(client.a.values.map(\.bitPattern), before[k].0).filter { $0 != $1 }.count
            let b = zip(client.b.values.map(\.bitPattern), before[k].1).filter { $0 != $1 }.count
            if a > 0 { changed.append("\(a) value(s) of client \(k)'s A") }
            if b > 0 { changed.append("\(b) value(s) of client \(k)'s B") }
            count += a + b
        }
        if count == 0 { return c.result(.pass, measured: 0, measure: "changed values", tolerance: 0) }
        return c.result(.fail, measured: Double(count), measure: "changed values", tolerance: 0,
                        "the plugin wrote to its input: \(changed.joined(separator: ", "))")
    }

    static func concurrentCalls(_ c: CheckContext) throws -> CheckResult {
        let shapes = [(12, 9), (9, 12), (16, 8), (5, 5), (8, 3), (10, 7)]
        let modules = shapes.enumerated().map { i, shape in
            (name: "conformance.layers.\(i).proj", dOut: shape.0, dIn: shape.1,
             clients: c.inputs.clients(c.inputs.standardSpecs(), dOut: shape.0, dIn: shape.1, seed: 100 + UInt64(i)))
        }
        let serialInstance = try c.subject.makeAggregator()
        let serial = try modules.map { m in
            try ModuleRound.withRound(module: m.name, dOut: m.dOut, dIn: m.dIn, clients: m.clients) { try serialInstance.aggregate($0) }
        }
        // A stateful strategy sees each module once per instance, as in a real round.
        let repeats = c.capabilities.contains(.stateful) ? 1 : 4
        let shared = try c.subject.makeAggregator()
        let box = ConcurrentResults(count: modules.count * repeats)
        let threads = 4
        let group = DispatchGroup()
        for t in 0..<threads {
            group.enter()
            let thread = Thread {
                var job = t
                while job < modules.count * repeats {
                    let m = modules[job % modules.count]
                    let outcome = Result {
                        try ModuleRound.withRound(module: m.name, dOut: m.dOut, dIn: m.dIn, clients: m.clients) { try shared.aggregate($0) }
                    }
                    box.set(job, outcome)
                    job += threads
                }
                group.leave()
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
        group.wait()
        var worst = 0.0
        var location = ""
        for (job, outcome) in box.snapshot().enumerated() {
            let i = job % modules.count, m = modules[i]
            switch outcome {
            case .success(let result)?:
                let ranks = m.clients.map(\.rank)
                let difference = Observation(result, dOut: m.dOut, dIn: m.dIn, ranks: ranks)
                    .difference(to: Observation(serial[i], dOut: m.dOut, dIn: m.dIn, ranks: ranks), mapping: Array(ranks.indices))
                if difference.error > worst { (worst, location) = (difference.error, "module '\(m.name)': \(difference.location)") }
            case .failure(let error)?:
                return c.result(.fail, "module '\(m.name)' failed when called concurrently but not serially: \(ConformanceSuite.describe(error))")
            case nil:
                return c.result(.fail, "module '\(m.name)' produced no result")
            }
        }
        return c.withinTolerance(worst, where: location)
    }

    static func exactUpdate(_ c: CheckContext) throws -> CheckResult {
        var worst = (error: 0.0, location: "")
        for (dOut, dIn, seed) in [(dOut, dIn, UInt64(9)), (6, 10, 10)] {
            let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: seed)
            let result = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.exact")
            let ideal = ModuleRound.withRound(module: "conformance.exact", dOut: dOut, dIn: dIn, clients: clients) { Reference.idealUpdate($0) }
            let error = Reference.relativeError(Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn), ideal)
            if error >= worst.error { worst = (error, "\(dOut)x\(dIn) module, ranks \(clients.map { String($0.rank) }.joined(separator: ", "))") }
        }
        guard c.capabilities.contains(.exact) else {
            return c.result(.skip, measured: worst.error, measure: "relative error",
                            "capability 'exact' not declared; the error is the aggregation bias, for information")
        }
        return c.withinTolerance(worst.error, where: "s·B·A + U·V against Σ p_k s_k B_k A_k, \(worst.location)")
    }

    static let mixedRanks: [InputFactory.Spec] = [
        .init(rank: 2, alpha: 16, rsLoRA: false, samples: 10),
        .init(rank: 5, alpha: 16, rsLoRA: false, samples: 30),
        .init(rank: 3, alpha: 16, rsLoRA: true, samples: 20),
    ]

    static func heterogeneousRefused(_ c: CheckContext) throws -> CheckResult {
        guard !c.capabilities.contains(.heterogeneousRanks) else {
            return c.result(.skip, "capability 'heterogeneous-ranks' is declared")
        }
        let clients = c.inputs.clients(mixedRanks, dOut: dOut, dIn: dIn, seed: 11)
        return c.expectRefusal("clients of ranks 2, 5 and 3", allowed: ["unsupported", "invalid input"]) {
            try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.heterogeneous")
        }
    }

    static func heterogeneousAccepted(_ c: CheckContext) throws -> CheckResult {
        guard c.capabilities.contains(.heterogeneousRanks) else {
            return c.result(.skip, "capability 'heterogeneous-ranks' not declared")
        }
        let clients = c.inputs.clients(mixedRanks, dOut: dOut, dIn: dIn, seed: 11)
        let result = try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.heterogeneous")
        var problems = result.shapeProblems(dOut: dOut, dIn: dIn, clientRanks: clients.map(\.rank))
        if !result.isFinite { problems.append("the result holds NaN or Inf") }
        let ideal = ModuleRound.withRound(module: "m", dOut: dOut, dIn: dIn, clients: clients) { Reference.idealUpdate($0) }
        let error = Reference.relativeError(Reference.effectiveUpdate(result, dOut: dOut, dIn: dIn), ideal)
        if problems.isEmpty {
            return c.result(.pass, measured: error, measure: "relative error", "against Σ p_k s_k B_k A_k, for information")
        }
        return c.result(.fail, measured: error, measure: "relative error", problems.joined(separator: "; "))
    }

    static func noClients(_ c: CheckContext) throws -> CheckResult {
        c.expectRefusal("a round without clients") {
            try c.aggregateUnvalidated([], dOut: dOut, dIn: dIn, module: "conformance.empty")
        }
    }

    static func zeroSamples(_ c: CheckContext) throws -> CheckResult {
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 12).map { client -> ClientUpdate in
            var client = client
            client.samples = 0
            return client
        }
        return c.expectRefusal("clients with zero samples in total") {
            try c.aggregateUnvalidated(clients, dOut: dOut, dIn: dIn, module: "conformance.zero-samples")
        }
    }

    static func mismatchedShapes(_ c: CheckContext) throws -> CheckResult {
        // Through the C ABI only ranks and module dimensions travel, so a
        // plugin cannot see these mismatches: the host refuses them before
        // the call. The plugin's own share is rank-zero-refused.
        let clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 13)
        func broken(_ change: (inout ClientUpdate) -> Void) -> [ClientUpdate] {
            var copy = clients
            change(&copy[1])
            return copy
        }
        let cases: [(String, [ClientUpdate])] = [
            ("A with d_in + 1 columns", broken { $0.a = Matrix(zeros: $0.rank, dIn + 1) }),
            ("B with d_out + 1 rows", broken { $0.b = Matrix(zeros: dOut + 1, $0.rank) }),
            ("B with one column more than A has rows", broken { $0.b = Matrix(zeros: dOut, $0.rank + 1) }),
        ]
        var messages: [String] = []
        for (what, round) in cases {
            let outcome = c.expectRefusal(what) { try c.aggregate(round, dOut: dOut, dIn: dIn, module: "conformance.shapes") }
            if outcome.outcome != .pass { return outcome }
            messages.append(outcome.detail)
        }
        return c.result(.pass, measured: Double(cases.count), measure: "refused cases", messages.first ?? "")
    }

    static func rankZero(_ c: CheckContext) throws -> CheckResult {
        let clients = (0..<2).map { k in
            ClientUpdate(id: "client-\(k)", samples: 10, scaling: 2, a: Matrix(zeros: 0, dIn), b: Matrix(zeros: dOut, 0))
        }
        return c.expectRefusal("clients of rank 0") {
            try c.aggregateUnvalidated(clients, dOut: dOut, dIn: dIn, module: "conformance.rank-zero")
        }
    }

    static func nonFinite(_ c: CheckContext, value: Float, inA: Bool) throws -> CheckResult {
        var clients = c.inputs.clients(c.inputs.standardSpecs(), dOut: dOut, dIn: dIn, seed: 14)
        if inA {
            // Every client when A is shared, so the round stays otherwise valid.
            for k in (c.inputs.sharedA ? Array(clients.indices) : [1]) { clients[k].a[1, 2] = value }
        } else {
            clients[1].b[3, 1] = value
        }
        let what = "\(value.isNaN ? "NaN" : "an infinity") in \(inA ? "A" : "B") of client 1"
        return c.expectRefusal(what) {
            try c.aggregate(clients, dOut: dOut, dIn: dIn, module: "conformance.non-finite")
        }
    }
}

extension CheckContext {
    /// Aggregates on a fresh instance and observes the updates.
    func observe(_ clients: [ClientUpdate], module: String) throws -> Observation {
        let result = try aggregate(clients, dOut: Checks.dOut, dIn: Checks.dIn, module: module)
        return Observation(result, dOut: Checks.dOut, dIn: Checks.dIn, ranks: clients.map(\.rank))
    }

    /// Compares the global update and every client's update with one expected update.
    func compare(_ observation: Observation, toEvery expected: [Double]) -> CheckResult {
        var worst = (Reference.relativeError(observation.global, expected), "global update s·B·A + U·V")
        for (k, update) in (observation.clients ?? []).enumerated() {
            let error = Reference.relativeError(update, expected)
            if error > worst.0 { worst = (error, "update of client \(k), from its payload") }
        }
        return withinTolerance(worst.0, where: worst.1)
    }
}

/// s·B·A of one client, dense in Double.
func clientUpdate(_ client: ClientUpdate, dOut: Int, dIn: Int) -> [Double] {
    var total = [Double](repeating: 0, count: dOut * dIn)
    client.b.withView { b in client.a.withView { a in
        Reference.accumulateProduct(b: b, a: a, weight: client.scaling, into: &total, dIn: dIn)
    } }
    return total
}

/// Results written by several threads.
final class ConcurrentResults: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<AggregationResult, Error>?]
    init(count: Int) { results = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<AggregationResult, Error>) {
        lock.lock()
        results[index] = value
        lock.unlock()
    }
    func snapshot() -> [Result<AggregationResult, Error>?] {
        lock.lock()
        defer { lock.unlock() }
        return results
    }
}
