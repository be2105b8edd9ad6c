import Foundation
import Testing
import LoraAggCore

/// A stateful C plugin: counts its aggregate calls across rounds and processes,
/// reports the count and the round index it saw, and returns the first
/// client's factors with B scaled by 1 + count, so its results depend on its
/// state. The forgetful variant's load_state accepts bytes but ignores them.
private func countingPlugin(forgetful: Bool = false) -> String {
    countingPluginSource.replacingOccurrences(of: "LOAD_INTO_STATE", with: forgetful ? "0" : "1")
}

private let countingPluginSource = """
    #include "lora_agg.h"
    #include <stdatomic.h>
    #include <stdlib.h>
    #include <string.h>
    typedef struct { _Atomic uint64_t calls; } state_t;
    static lora_agg_status create(const char *c, const lora_agg_host_api *h, void **s, char *e, size_t n) {
        *s = calloc(1, sizeof(state_t)); return LORA_AGG_OK; }
    static lora_agg_status aggregate(void *s, const lora_agg_round *r, lora_agg_result *o, char *e, size_t n) {
        uint64_t before = atomic_fetch_add(&((state_t *)s)->calls, 1);
        const lora_agg_client *c = &r->clients[0];
        size_t na = (size_t)c->rank * r->d_in, nb = (size_t)r->d_out * c->rank;
        o->rank = c->rank; o->scaling = c->scaling;
        o->a = malloc(na * sizeof(float)); memcpy(o->a, c->a, na * sizeof(float));
        o->b = malloc(nb * sizeof(float));
        for (size_t i = 0; i < nb; i++) o->b[i] = c->b[i] * (float)(1 + before);
        lora_agg_diagnostic *d = malloc(2 * sizeof *d);
        d[0].name = "calls_before"; d[0].value = (double)before;
        d[1].name = "round_index"; d[1].value = (double)r->round_index;
        o->diagnostics = d; o->diagnostic_count = 2;
        return LORA_AGG_OK; }
    static void free_result(void *s, lora_agg_result *o) { free(o->a); free(o->b); free((void *)o->diagnostics); }
    static void destroy(void *s) { free(s); }
    static lora_agg_status save_state(void *s, lora_agg_bytes *out, char *e, size_t n) {
        uint64_t *copy = malloc(8); *copy = atomic_load(&((state_t *)s)->calls);
        out->data = (const uint8_t *)copy; out->size = 8; out->plugin_private = copy; return LORA_AGG_OK; }
    static lora_agg_status load_state(void *s, const uint8_t *data, uint64_t size, char *e, size_t n) {
        if (size != 8) { strncpy(e, "saved state must be 8 bytes", n); return LORA_AGG_INVALID_STATE; }
        uint64_t v; memcpy(&v, data, 8); if (LOAD_INTO_STATE) atomic_store(&((state_t *)s)->calls, v); return LORA_AGG_OK; }
    static void free_bytes(void *s, lora_agg_bytes *b) { free(b->plugin_private); }
    static const lora_agg_plugin descriptor = {
        .abi_major = LORA_AGG_ABI_MAJOR, .abi_minor = LORA_AGG_ABI_MINOR, .struct_size = sizeof(lora_agg_plugin),
        .name = "counting", .version = "1.0.0", .summary = "Counts its calls across rounds.",
        .citation = "None, test fixture", .description = "", .parameters_schema = "[]",
        .capabilities = LORA_AGG_CAP_STATEFUL, .create = create, .aggregate = aggregate,
        .free_result = free_result, .destroy = destroy, .save_state = save_state,
        .load_state = load_state, .free_bytes = free_bytes };
    __attribute__((visibility("default"))) const lora_agg_plugin *lora_agg_plugin_entry(void) { return &descriptor; }
    """

@Suite("stateful strategies across rounds and processes")
struct StatefulStrategyTests {
    /// The `diagnostics` of every module in a run's report.json.
    private func diagnostics(_ output: String) throws -> [[String: Double]] {
        let data = try Data(contentsOf: URL(fileURLWithPath: output + "/report.json"))
        let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let modules = try #require(report["modules"] as? [[String: Any]])
        return modules.map { ($0["diagnostics"] as? [String: Double]) ?? [:] }
    }

    @Test("--state carries a plugin's state from one aggregate process to the next, and --round reaches it")
    func stateSurvivesProcesses() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let plugin = try CPluginFactory.compile(countingPlugin(), name: "counting", in: folder)
        let clients = folder + "/clients", state = folder + "/counting.state"
        #expect(try CLI.run(["demo", "--write-clients", clients]).status == 0)
        let inputs = ["--client", clients + "/client-4=3", "--client", clients + "/client-5=1"]

        let first = try CLI.run(["aggregate", "--plugin-path", plugin, "--strategy", "counting", "--out", folder + "/r0",
                                 "--state", state, "--round", "0"] + inputs)
        #expect(first.status == 0, "\(first.stderr)")
        let round0 = try diagnostics(folder + "/r0")
        #expect(Set(round0.compactMap { $0["calls_before"] }) == [0, 1, 2])
        #expect(try Data(contentsOf: URL(fileURLWithPath: state)).count == 8)

        let second = try CLI.run(["aggregate", "--plugin-path", plugin, "--strategy", "counting", "--out", folder + "/r1",
                                  "--state", state, "--round", "1"] + inputs)
        #expect(second.status == 0, "\(second.stderr)")
        let round1 = try diagnostics(folder + "/r1")
        #expect(Set(round1.compactMap { $0["calls_before"] }) == [3, 4, 5])
        #expect(round1.allSatisfy { $0["round_index"] == 1 })
    }

    @Test("a corrupt state file is refused with the plugin's message and no output")
    func corruptState() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let plugin = try CPluginFactory.compile(countingPlugin(), name: "counting", in: folder)
        let clients = folder + "/clients", state = folder + "/bad.state"
        #expect(try CLI.run(["demo", "--write-clients", clients]).status == 0)
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: state))
        let outcome = try CLI.run(["aggregate", "--plugin-path", plugin, "--strategy", "counting", "--out", folder + "/out",
                                   "--state", state, "--client", clients + "/client-4"])
        #expect(outcome.status != 0)
        #expect(outcome.stderr.contains("saved state must be 8 bytes"))
        #expect(!FileManager.default.fileExists(atPath: folder + "/out"))
    }

    @Test("--state with a stateless strategy is a usage error naming the strategy")
    func statelessRefusesState() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let clients = folder + "/clients"
        #expect(try CLI.run(["demo", "--write-clients", clients]).status == 0)
        let outcome = try CLI.run(["aggregate", "--plugin-path", TestSupport.buildFolder, "--strategy", "fedit", "--out", folder + "/out",
                                   "--state", folder + "/s", "--client", clients + "/client-4"])
        #expect(outcome.status != 0)
        #expect(outcome.stderr.contains("strategy 'fedit' keeps no state across rounds"))
    }

    @Test("the conformance suite's state-round-trips check passes a faithful stateful plugin and fails a forgetful one")
    func conformanceChecksState() throws {
        let folder = try CPluginFactory.temporaryFolder()
        let faithful = try CPluginFactory.compile(countingPlugin(), name: "counting", in: folder)
        let forgetful = try CPluginFactory.compile(countingPlugin(forgetful: true), name: "forgetful", in: folder)
        let good = try CLI.run(["conformance", faithful, "--check", "state-round-trips"])
        #expect(good.status == 0, "\(good.stdout)\(good.stderr)")
        #expect(good.stdout.contains("PASS  state-round-trips"))
        let bad = try CLI.run(["conformance", forgetful, "--check", "state-round-trips"])
        #expect(bad.status != 0)
        #expect(bad.stdout.contains("FAIL  state-round-trips"))
        #expect(bad.stdout.contains("differ between the original instance and one restored"))
    }
}
