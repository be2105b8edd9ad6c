import Testing
import LoraAggCore
import LoraAggHost

@Suite("lora-fair")
struct LoRAFAIRTests {
    func aggregate(_ clients: [ClientUpdate], dOut: Int, dIn: Int, strategy: String = "lora-fair",
                   _ assignments: [String] = []) throws -> AggregationResult {
        let aggregator = try TestSupport.registry.plugin(named: strategy).makeAggregator(assignments: assignments)
        return try ModuleRound.withRound(module: "v_proj", dOut: dOut, dIn: dIn, clients: clients) { try aggregator.aggregate($0) }
    }

    func ideal(_ clients: [ClientUpdate], dOut: Int, dIn: Int) -> [Double] {
        ModuleRound.withRound(module: "v_proj", dOut: dOut, dIn: dIn, clients: clients) { Reference.idealUpdate($0) }
    }

    /// Non-IID clients (independent random factors), mixed scalings (α/r and rsLoRA α/√r), unequal samples.
    func nonIIDClients(dOut: Int = 12, dIn: Int = 9, rank: Int = 3, seed: UInt64 = 21) -> [ClientUpdate] {
        var generator = TestSupport.SeededGenerator(seed: seed)
        let scalings = [16.0 / 3, 8.0 / 3, 16.0 / 3.0.squareRoot(), 2]
        let samples = [40.0, 10, 25, 25]
        return (0..<4).map { k in
            TestSupport.randomClient("client-\(k)", rank: rank, dOut: dOut, dIn: dIn, samples: samples[k],
                                     scaling: scalings[k], &generator)
        }
    }

    /// The dense Double reference of the closed form, from the formulas:
    /// Ā, B̄ by rescaled sample averages, T = Σ p_k (s_k/s) B_k A_k,
    /// ΔB = (T − B̄Ā)Āᵀ (ĀĀᵀ + λ tr(ĀĀᵀ)/r · I)⁻¹.
    func denseClosedForm(_ clients: [ClientUpdate], lambda: Double) -> (a: Dense, b: Dense, deltaB: Dense, target: Dense) {
        let total = clients.reduce(0) { $0 + $1.samples }
        let p = clients.map { $0.samples / total }
        let s = Set(clients.map(\.scaling)).count == 1 ? clients[0].scaling : zip(p, clients).reduce(0) { $0 + $1.0 * $1.1.scaling }
        let r = clients[0].rank
        var a = Dense(zeros: r, clients[0].a.cols), b = Dense(zeros: clients[0].b.rows, r)
        var target = Dense(zeros: clients[0].b.rows, clients[0].a.cols)
        for (k, client) in clients.enumerated() {
            let c = (client.scaling / s).squareRoot()
            a = a + (p[k] * c) * Dense(client.a)
            b = b + (p[k] * c) * Dense(client.b)
            target = target + (p[k] * client.scaling / s) * (Dense(client.b) * Dense(client.a))
        }
        let gram = a * a.transposed
        let trace = (0..<r).reduce(0.0) { $0 + gram[$1, $1] }
        let regularised = gram + (lambda * trace / Double(r)) * Dense.identity(r)
        let deltaB = ((target - b * a) * a.transposed).rightDivided(by: regularised)
        return (a, b, deltaB, target)
    }

    @Test("a 2x3 module worked by hand: ΔB = (T − B̄Ā)Āᵀ / (ĀĀᵀ(1 + λ))")
    func handWorked() throws {
        let clients = [
            ClientUpdate(id: "x", samples: 1, scaling: 1,
                         a: Matrix(rows: 1, cols: 3, values: [1, 0, 0]), b: Matrix(rows: 2, cols: 1, values: [1, 0])),
            ClientUpdate(id: "y", samples: 1, scaling: 1,
                         a: Matrix(rows: 1, cols: 3, values: [1, 1, 0]), b: Matrix(rows: 2, cols: 1, values: [0, 1])),
        ]
        // Ā = [1, .5, 0], B̄ = [.5, .5]ᵀ, T − B̄Ā = [[0, −.25, 0], [0, .25, 0]],
        // (T − B̄Ā)Āᵀ = [−.125, .125]ᵀ, ĀĀᵀ = 1.25, so ΔB = ±0.1 at λ = 0.
        let exact = try aggregate(clients, dOut: 2, dIn: 3, ["lambda=0"])
        #expect(Dense(exact.a).maxDifference(Dense(rows: 1, cols: 3, values: [1, 0.5, 0])) < 1e-7)
        #expect(Dense(exact.b).maxDifference(Dense(rows: 2, cols: 1, values: [0.4, 0.6])) < 1e-6)
        // λ = 0.01 (default) with r = 1: λ' = 0.01 · 1.25, ΔB = ±0.125 / 1.2625.
        let regularised = try aggregate(clients, dOut: 2, dIn: 3)
        let shift = 0.125 / 1.2625
        #expect(Dense(regularised.b).maxDifference(Dense(rows: 2, cols: 1, values: [0.5 - shift, 0.5 + shift])) < 1e-6)
        #expect(abs(try #require(regularised.diagnostic("delta_b_relative")) - shift * 2.0.squareRoot() / 0.5.squareRoot()) < 1e-6)
        #expect(abs(try #require(regularised.diagnostic("lambda_effective")) - 0.0125) < 1e-8)
    }

    @Test("a non-square module with mixed scalings matches the closed form computed densely in Double")
    func goldenMixedScalings() throws {
        let clients = nonIIDClients(dOut: 4, dIn: 3, rank: 2, seed: 8)
        let result = try aggregate(clients, dOut: 4, dIn: 3)
        let expected = denseClosedForm(clients, lambda: 0.01)
        #expect(Dense(result.a).maxDifference(expected.a) < 1e-5)
        #expect(Dense(result.b).maxDifference(expected.b + expected.deltaB) < 1e-4)
        #expect(expected.deltaB.norm > 0.01, "the correction is not trivially zero")
        let p = [0.4, 0.1, 0.25, 0.25]
        #expect(abs(result.scaling - zip(p, clients).reduce(0) { $0 + $1.0 * $1.1.scaling }) < 1e-12)
    }

    @Test("on non-IID clients the corrected product is closer to the ideal update than FedIT's, and the diagnostics say so")
    func beatsFedIT() throws {
        let clients = nonIIDClients()
        let truth = ideal(clients, dOut: 12, dIn: 9)
        let fair = try aggregate(clients, dOut: 12, dIn: 9)
        let fedit = try aggregate(clients, dOut: 12, dIn: 9, strategy: "fedit")
        let fairUpdate = Reference.effectiveUpdate(fair, dOut: 12, dIn: 9)
        let feditUpdate = Reference.effectiveUpdate(fedit, dOut: 12, dIn: 9)
        #expect(Reference.relativeError(fairUpdate, truth) < Reference.relativeError(feditUpdate, truth))
        #expect(fair.a == fedit.a, "Ā is FedIT's")
        let before = try #require(fair.diagnostic("cosine_before"))
        let after = try #require(fair.diagnostic("cosine_after"))
        #expect(abs(before - Reference.cosine(feditUpdate, truth)) < 1e-5)
        #expect(abs(after - Reference.cosine(fairUpdate, truth)) < 1e-5)
        #expect(after > before)
        let deltaB = Dense(fair.b) - Dense(fedit.b)
        #expect(abs(try #require(fair.diagnostic("delta_b_relative")) - deltaB.norm / Dense(fedit.b).norm) < 1e-5)
    }

    @Test("as λ goes to 0 the result tends to the dense least-squares fit")
    func tendsToLeastSquares() throws {
        let clients = nonIIDClients(seed: 4)
        let leastSquares = denseClosedForm(clients, lambda: 0)
        let fit = leastSquares.b + leastSquares.deltaB
        var previous = Double.infinity
        for lambda in [1.0, 0.1, 0.01, 1e-4, 0] {
            let result = try aggregate(clients, dOut: 12, dIn: 9, ["lambda=\(lambda)"])
            let distance = Dense(result.b).maxDifference(fit)
            #expect(distance < previous, "λ = \(lambda)")
            previous = distance
        }
        #expect(previous < 1e-4)
        // Least squares is the best any B can do with this Ā.
        let result = try aggregate(clients, dOut: 12, dIn: 9, ["lambda=0"])
        let residual = (Dense(result.b) * Dense(result.a)) - leastSquares.target
        let gradient = residual * leastSquares.a.transposed
        #expect(gradient.norm < 1e-4 * leastSquares.target.norm)
    }

    @Test("a rank-deficient Ā at λ = 0 gives a finite least-squares fit (pseudo-inverse)")
    func rankDeficientA() throws {
        // Every client's second row of A is twice its first, so Ā has rank 1 < r = 2.
        var generator = TestSupport.SeededGenerator(seed: 6)
        let clients = (0..<3).map { k in
            let first = TestSupport.randomMatrix(1, 5, &generator)
            let a = Matrix(rows: 2, cols: 5, values: first.values + first.values.map { 2 * $0 })
            return ClientUpdate(id: "c\(k)", samples: Double(k + 1), scaling: 2, a: a, b: TestSupport.randomMatrix(6, 2, &generator))
        }
        let result = try aggregate(clients, dOut: 6, dIn: 5, ["lambda=0"])
        #expect(result.isFinite)
        let reference = denseClosedForm(clients, lambda: 1)  // only for Ā and T
        let gradient = ((Dense(result.b) * reference.a) - reference.target) * reference.a.transposed
        #expect(gradient.norm < 1e-4 * reference.target.norm)
        let fedit = try aggregate(clients, dOut: 6, dIn: 5, strategy: "fedit")
        #expect(try #require(result.diagnostic("cosine_after")) >= (try #require(result.diagnostic("cosine_before"))))
        #expect(Dense(result.b).maxDifference(Dense(fedit.b)) > 1e-3)
    }

    @Test("solver=cosine raises the cosine and approaches the best cosine reachable with this Ā")
    func cosineSolver() throws {
        let clients = nonIIDClients(seed: 9)
        let truth = ideal(clients, dOut: 12, dIn: 9)
        let result = try aggregate(clients, dOut: 12, dIn: 9, ["solver=cosine"])
        let before = try #require(result.diagnostic("cosine_before"))
        let after = try #require(result.diagnostic("cosine_after"))
        #expect(after > before + 1e-3)
        #expect(abs(after - Reference.cosine(Reference.effectiveUpdate(result, dOut: 12, dIn: 9), truth)) < 1e-5)
        #expect(try #require(result.diagnostic("delta_b_relative")) > 0)
        // Without the penalty the optimum is the projection onto the row space of Ā: the λ = 0 least-squares fit.
        let free = try aggregate(clients, dOut: 12, dIn: 9, ["solver=cosine", "lambda=0", "iterations=3000"])
        let best = try aggregate(clients, dOut: 12, dIn: 9, ["lambda=0"])
        let bestCosine = try #require(best.diagnostic("cosine_after"))
        #expect(try #require(free.diagnostic("cosine_after")) > bestCosine - 1e-4)
        #expect(try #require(free.diagnostic("cosine_after")) <= bestCosine + 1e-6)
        // A larger penalty moves B̄ less.
        let stiff = try aggregate(clients, dOut: 12, dIn: 9, ["solver=cosine", "lambda=0.1"])
        #expect(try #require(stiff.diagnostic("delta_b_relative")) < (try #require(result.diagnostic("delta_b_relative"))))
    }

    @Test("zero factors (PEFT's B = 0 at round 0) give a zero correction, and diagnostics=false drops the cosines")
    func degenerateAndQuiet() throws {
        let zeroB = (0..<3).map { k in
            ClientUpdate(id: "c\(k)", samples: 1, scaling: 2, a: Matrix(rows: 2, cols: 3) { Float($0 + $1 + k) },
                         b: Matrix(zeros: 4, 2))
        }
        for solver in ["closed-form", "cosine"] {
            let result = try aggregate(zeroB, dOut: 4, dIn: 3, ["solver=\(solver)"])
            #expect(result.b.values.allSatisfy { $0 == 0 })
            #expect(result.diagnostic("delta_b_relative") == 0)
        }
        let quiet = try aggregate(nonIIDClients(), dOut: 12, dIn: 9, ["diagnostics=false"])
        #expect(quiet.diagnostic("cosine_before") == nil)
        #expect(quiet.diagnostic("delta_b_relative") != nil)
    }

    @Test("clients of different ranks are refused with an error naming the ranks")
    func refusesMixedRanks() throws {
        var generator = TestSupport.SeededGenerator(seed: 1)
        let clients = [TestSupport.randomClient("small", rank: 2, dOut: 4, dIn: 3, &generator),
                       TestSupport.randomClient("large", rank: 4, dOut: 4, dIn: 3, &generator)]
        let error = #expect(throws: AggregationError.self) { try aggregate(clients, dOut: 4, dIn: 3) }
        #expect(error?.message.contains("'small' r=2") == true)
        #expect(error?.message.contains("'large' r=4") == true)
        #expect(try TestSupport.registry.plugin(named: "lora-fair").info.capabilities == [])
    }
}
