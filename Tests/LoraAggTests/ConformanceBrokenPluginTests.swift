import Foundation
import Testing
import LoraAggConformance

/// Deliberately broken C plugins: the suite must catch each bug with the
/// right check, and isolate crashes and hangs.
@Suite("conformance suite catches broken plugins")
struct ConformanceBrokenPluginTests {
    /// FedIT in C, with one bug switched on by a -D flag.
    static let source = #"""
    #include <math.h>
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <unistd.h>
    #include "lora_agg.h"
    #ifndef CAPS
    #define CAPS 0
    #endif

    static lora_agg_status create(const char *config, const lora_agg_host_api *host, void **out, char *error, size_t cap) {
        (void)config; (void)host; (void)error; (void)cap;
        *out = malloc(1);
        return LORA_AGG_OK;
    }

    static lora_agg_status aggregate(void *state, const lora_agg_round *round, lora_agg_result *result, char *error, size_t cap) {
        (void)state;
        if (round->client_count == 0) { snprintf(error, cap, "no clients"); return LORA_AGG_INVALID_INPUT; }
        const uint32_t r = round->clients[0].rank;
        double total = 0, common = round->clients[0].scaling;
        int same = 1;
        for (uint32_t k = 0; k < round->client_count; k++) {
            const lora_agg_client *c = &round->clients[k];
            if (c->rank == 0) { snprintf(error, cap, "rank 0"); return LORA_AGG_INVALID_INPUT; }
            if (c->rank != r) {
    #ifdef BUG_HANG_ON_MIXED_RANKS
                for (;;) sleep(1);
    #endif
                snprintf(error, cap, "equal ranks only");
                return LORA_AGG_UNSUPPORTED;
            }
            for (size_t i = 0; i < (size_t)r * round->d_in; i++)
                if (!isfinite(c->a[i])) {
    #ifdef BUG_CRASH_ON_NAN
                    raise(SIGSEGV);
    #endif
                    snprintf(error, cap, "non-finite A"); return LORA_AGG_INVALID_INPUT;
                }
            for (size_t i = 0; i < (size_t)r * round->d_out; i++)
                if (!isfinite(c->b[i])) {
    #ifdef BUG_CRASH_ON_NAN
                    raise(SIGSEGV);
    #endif
                    snprintf(error, cap, "non-finite B"); return LORA_AGG_INVALID_INPUT;
                }
            total += c->samples;
            same &= c->scaling == common;
        }
        if (!(total > 0)) { snprintf(error, cap, "zero samples"); return LORA_AGG_INVALID_INPUT; }
        if (!same) {
            common = 0;
            for (uint32_t k = 0; k < round->client_count; k++) common += round->clients[k].samples / total * round->clients[k].scaling;
        }
        const size_t na = (size_t)r * round->d_in, nb = (size_t)round->d_out * r;
        float *a = calloc(na, sizeof(float)), *b = calloc(nb, sizeof(float));
        for (uint32_t k = 0; k < round->client_count; k++) {
            const lora_agg_client *c = &round->clients[k];
            double p = c->samples / total;
    #ifdef BUG_IGNORE_WEIGHTS
            p = 1.0 / round->client_count;
    #endif
    #ifdef BUG_RAW_WEIGHTS
            p = c->samples / 100.0;
    #endif
            const float w = (float)(p * (c->scaling == common ? 1.0 : sqrt(c->scaling / common)));
            for (size_t i = 0; i < na; i++) a[i] += w * c->a[i];
            for (size_t i = 0; i < nb; i++) b[i] += w * c->b[i];
        }
    #ifdef BUG_MUTATE_INPUT
        ((float *)round->clients[0].a)[0] += 1.0f;
    #endif
        result->rank = r;
        result->scaling = common;
        result->a = a;
        result->b = b;
        return LORA_AGG_OK;
    }

    static void free_result(void *state, lora_agg_result *result) { (void)state; free(result->a); free(result->b); }
    static void destroy(void *state) { free(state); }

    static const lora_agg_plugin descriptor = {
        .abi_major = LORA_AGG_ABI_MAJOR, .abi_minor = LORA_AGG_ABI_MINOR, .struct_size = sizeof(lora_agg_plugin),
        .name = NAME, .version = "0.0.1", .summary = "A deliberately broken plugin for the conformance tests.",
        .citation = "none", .description = "", .parameters_schema = "[]", .capabilities = CAPS,
        .create = create, .aggregate = aggregate, .free_result = free_result, .destroy = destroy,
    };
    __attribute__((visibility("default"))) const lora_agg_plugin *lora_agg_plugin_entry(void) { return &descriptor; }
    """#

    /// A plugin using every optional part of a result: FedIT factors, the
    /// exact residual U·V = Σ p_k s_k B_k A_k − s·B̄·Ā kept factored
    /// (U = [p_1 s_1 B_1 … p_K s_K B_K, −s B̄], V = [A_1; …; A_K; Ā]), and a
    /// payload per client (Ā with its own B_k, FedSA-style). It exercises the
    /// suite's comparison of updates through residuals and payloads.
    static let residualSource = #"""
    #include <math.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include "lora_agg.h"

    typedef struct storage { float *blocks[5]; lora_agg_client_payload *payloads; } storage;

    static lora_agg_status create(const char *config, const lora_agg_host_api *host, void **out, char *error, size_t cap) {
        (void)config; (void)host; (void)error; (void)cap;
        *out = malloc(1);
        return LORA_AGG_OK;
    }

    static lora_agg_status aggregate(void *state, const lora_agg_round *round, lora_agg_result *result, char *error, size_t cap) {
        (void)state;
        const uint32_t n = round->client_count;
        if (n == 0) { snprintf(error, cap, "no clients"); return LORA_AGG_INVALID_INPUT; }
        const uint32_t r = round->clients[0].rank;
        const size_t dout = round->d_out, din = round->d_in;
        double total = 0, common = round->clients[0].scaling;
        int same = 1;
        for (uint32_t k = 0; k < n; k++) {
            const lora_agg_client *c = &round->clients[k];
            if (c->rank == 0) { snprintf(error, cap, "rank 0"); return LORA_AGG_INVALID_INPUT; }
            if (c->rank != r) { snprintf(error, cap, "equal ranks only"); return LORA_AGG_UNSUPPORTED; }
            for (size_t i = 0; i < r * din; i++) if (!isfinite(c->a[i])) { snprintf(error, cap, "non-finite A"); return LORA_AGG_INVALID_INPUT; }
            for (size_t i = 0; i < dout * r; i++) if (!isfinite(c->b[i])) { snprintf(error, cap, "non-finite B"); return LORA_AGG_INVALID_INPUT; }
            total += c->samples;
            same &= c->scaling == common;
        }
        if (!(total > 0)) { snprintf(error, cap, "zero samples"); return LORA_AGG_INVALID_INPUT; }
        if (!same) { common = 0; for (uint32_t k = 0; k < n; k++) common += round->clients[k].samples / total * round->clients[k].scaling; }
        const size_t q = (size_t)(n + 1) * r;
        storage *st = calloc(1, sizeof *st);
        float *a = calloc(r * din, sizeof(float)), *b = calloc(dout * r, sizeof(float));
        float *u = calloc(dout * q, sizeof(float)), *v = calloc(q * din, sizeof(float));
        float *own_b = calloc(n * dout * r, sizeof(float));
        lora_agg_client_payload *payloads = calloc(n, sizeof *payloads);
        for (uint32_t k = 0; k < n; k++) {
            const lora_agg_client *c = &round->clients[k];
            const double p = c->samples / total;
            const float w = (float)(p * (c->scaling == common ? 1.0 : sqrt(c->scaling / common)));
            for (size_t i = 0; i < r * din; i++) a[i] += w * c->a[i];
            for (size_t i = 0; i < dout * r; i++) b[i] += w * c->b[i];
            for (size_t i = 0; i < dout; i++)
                for (size_t t = 0; t < r; t++) u[i * q + k * r + t] = (float)(p * c->scaling) * c->b[i * r + t];
            for (size_t t = 0; t < r; t++)
                for (size_t j = 0; j < din; j++) v[(k * r + t) * din + j] = c->a[t * din + j];
            for (size_t i = 0; i < dout * r; i++) own_b[k * dout * r + i] = c->b[i];
        }
        for (size_t i = 0; i < dout; i++)
            for (size_t t = 0; t < r; t++) u[i * q + n * r + t] = (float)(-common) * b[i * r + t];
        for (size_t t = 0; t < r; t++)
            for (size_t j = 0; j < din; j++) v[(n * r + t) * din + j] = a[t * din + j];
        for (uint32_t k = 0; k < n; k++) {
    #ifdef BUG_REVERSED_PAYLOADS
            const uint32_t source = n - 1 - k;
    #else
            const uint32_t source = k;
    #endif
            payloads[k].struct_size = sizeof payloads[k];
            payloads[k].rank = r;
            payloads[k].scaling = round->clients[source].scaling;
            payloads[k].a = a;
            payloads[k].b = own_b + source * dout * r;
        }
        st->blocks[0] = a; st->blocks[1] = b; st->blocks[2] = u; st->blocks[3] = v; st->blocks[4] = own_b;
        st->payloads = payloads;
        result->rank = r; result->scaling = common; result->a = a; result->b = b;
        result->residual_rank = (uint32_t)q; result->residual_u = u; result->residual_v = v;
        result->client_payload_count = n; result->client_payloads = payloads;
        result->plugin_private = st;
        return LORA_AGG_OK;
    }

    static void free_result(void *state, lora_agg_result *result) {
        (void)state;
        storage *st = result->plugin_private;
        for (int i = 0; i < 5; i++) free(st->blocks[i]);
        free(st->payloads);
        free(st);
    }
    static void destroy(void *state) { free(state); }

    static const lora_agg_plugin descriptor = {
        .abi_major = LORA_AGG_ABI_MAJOR, .abi_minor = LORA_AGG_ABI_MINOR, .struct_size = sizeof(lora_agg_plugin),
        .name = NAME, .version = "0.0.1", .summary = "Exact through a factored residual, with per-client payloads; for the tests.",
        .citation = "none", .description = "", .parameters_schema = "[]",
        .capabilities = LORA_AGG_CAP_EXACT | LORA_AGG_CAP_BASE_RESIDUAL | LORA_AGG_CAP_PER_CLIENT_PAYLOADS,
        .create = create, .aggregate = aggregate, .free_result = free_result, .destroy = destroy,
    };
    __attribute__((visibility("default"))) const lora_agg_plugin *lora_agg_plugin_entry(void) { return &descriptor; }
    """#

    /// Compiles one variant into `folder/lib<file>.so`.
    static func build(_ file: String, name: String, flags: [String], in folder: String, source: String = source) throws -> String {
        let sourcePath = folder + "/\(file).c"
        try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
        let output = folder + "/lib\(file).so"
        let result = try ConformanceTools.run("/usr/bin/env", ["cc", "-shared", "-fPIC", "-std=c11", "-D_POSIX_C_SOURCE=200809L",
                                                               "-I", CPluginFactory.includeFolder, "-DNAME=\"\(name)\""]
                                              + flags + [sourcePath, "-o", output, "-lm"])
        #expect(result.status == 0, "cc failed: \(result.stderr)")
        return output
    }

    @Test("each bug fails its own check, a crash becomes CRASH for that check only, and the run exits 1")
    func brokenPluginsAreCaught() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let plugins = [
            try Self.build("Correct", name: "broken-none", flags: [], in: folder),
            try Self.build("IgnoresWeights", name: "broken-ignores-weights", flags: ["-DBUG_IGNORE_WEIGHTS"], in: folder),
            try Self.build("RawWeights", name: "broken-raw-weights", flags: ["-DBUG_RAW_WEIGHTS"], in: folder),
            try Self.build("FalseExact", name: "broken-false-exact", flags: ["-DCAPS=LORA_AGG_CAP_EXACT"], in: folder),
            try Self.build("FalseHeterogeneous", name: "broken-false-heterogeneous", flags: ["-DCAPS=LORA_AGG_CAP_HETEROGENEOUS_RANKS"], in: folder),
            try Self.build("CrashOnNaN", name: "broken-crash-on-nan", flags: ["-DBUG_CRASH_ON_NAN"], in: folder),
            try Self.build("MutatesInput", name: "broken-mutates-input", flags: ["-DBUG_MUTATE_INPUT"], in: folder),
            try Self.build("BadName", name: "Broken_Name", flags: [], in: folder),
        ]
        let output = try ConformanceTools.loraAgg(["conformance", "--json"] + plugins)
        #expect(output.status == 1)
        let report = try ConformanceTools.decodeReport(output.stdout)
        func outcome(_ plugin: String, _ check: String) -> String { report[plugin]?[check]?.outcome ?? "missing" }

        // The control: the same source without a bug passes everything.
        for id in ConformanceSuite.checkIDs {
            #expect(["pass", "skip"].contains(outcome("broken-none", id)), "broken-none \(id): \(report["broken-none"]?[id]?.detail ?? "")")
        }
        // Uniform weights: a duplicated client counts twice, doubled samples count once.
        #expect(outcome("broken-ignores-weights", "duplicate-client-equals-double-samples") == "fail")
        #expect(outcome("broken-ignores-weights", "single-client-unchanged") == "pass")
        // Unnormalised n_k: scaling every sample count changes the result.
        #expect(outcome("broken-raw-weights", "sample-weights-renormalized") == "fail")
        #expect(outcome("broken-raw-weights", "single-client-unchanged") == "fail")
        // Claims exact but averages factors.
        #expect(outcome("broken-false-exact", "exact-update") == "fail")
        #expect(outcome("broken-false-exact", "client-order-irrelevant") == "pass")
        // Claims heterogeneous ranks but refuses them.
        #expect(outcome("broken-false-heterogeneous", "heterogeneous-ranks-accepted") == "fail")
        #expect(outcome("broken-false-heterogeneous", "heterogeneous-ranks-refused") == "skip")
        // Crashes on NaN/Inf: those four checks crash, every other check still ran.
        for id in ["nan-in-a-refused", "nan-in-b-refused", "inf-in-a-refused", "inf-in-b-refused"] {
            #expect(outcome("broken-crash-on-nan", id) == "crashed")
            #expect(report["broken-crash-on-nan"]?[id]?.detail.contains("SIGSEGV") == true)
        }
        #expect(outcome("broken-crash-on-nan", "single-client-unchanged") == "pass")
        #expect(outcome("broken-crash-on-nan", "rank-zero-refused") == "pass")
        // Writes to its input.
        #expect(outcome("broken-mutates-input", "inputs-not-mutated") == "fail")
        // Metadata the loader refuses: the load check fails, the rest are skipped.
        #expect(outcome("libBadName.so", "load-and-metadata") == "fail")
        #expect(report["libBadName.so"]?["load-and-metadata"]?.detail.contains("'Broken_Name' is not kebab-case") == true)
        #expect(outcome("libBadName.so", "deterministic") == "skip")
    }

    @Test("residuals and per-client payloads are compared as updates: an exact plugin using both passes, swapped payloads fail")
    func residualsAndPayloads() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let plugins = [
            try Self.build("Residual", name: "residual-payloads", flags: [], in: folder, source: Self.residualSource),
            try Self.build("Reversed", name: "reversed-payloads", flags: ["-DBUG_REVERSED_PAYLOADS"], in: folder, source: Self.residualSource),
        ]
        let output = try ConformanceTools.loraAgg(["conformance", "--json"] + plugins)
        let report = try ConformanceTools.decodeReport(output.stdout)
        func outcome(_ plugin: String, _ check: String) -> String { report[plugin]?[check]?.outcome ?? "missing" }
        for id in ConformanceSuite.checkIDs {
            #expect(["pass", "skip"].contains(outcome("residual-payloads", id)), "residual-payloads \(id): \(report["residual-payloads"]?[id]?.detail ?? "")")
        }
        // The exact check ran (not skipped): the residual closes the gap to Σ p_k s_k B_k A_k.
        #expect(outcome("residual-payloads", "exact-update") == "pass")
        // Client k receiving client K−1−k's B: the global update is right, the clients' are not.
        #expect(outcome("reversed-payloads", "exact-update") == "pass")
        #expect(outcome("reversed-payloads", "client-order-irrelevant") == "fail")
        #expect(report["reversed-payloads"]?["client-order-irrelevant"]?.detail.contains("from its payload") == true)
        #expect(outcome("reversed-payloads", "identical-clients-return-that-client") == "pass")
    }

    @Test("a check that hangs is killed after --timeout and reported as CRASH; later checks still run")
    func hangingPluginIsKilled() throws {
        let folder = try CPluginFactory.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let plugin = try Self.build("Hangs", name: "broken-hangs", flags: ["-DBUG_HANG_ON_MIXED_RANKS"], in: folder)
        let started = Date()
        let output = try ConformanceTools.loraAgg(["conformance", "--timeout", "3", plugin])
        #expect(output.status == 1)
        #expect(Date().timeIntervalSince(started) < 60)
        let line = output.stdout.split(separator: "\n").first { $0.contains("heterogeneous-ranks-refused") } ?? ""
        #expect(line.contains("CRASH"), "\(output.stdout)")
        #expect(output.stdout.contains("no progress for 3 s"))
        #expect(output.stdout.contains("PASS  nan-in-a-refused"))
    }
}
