/*
 * lora_agg.h — the lora-agg plugin ABI, version 1.0.
 *
 * This header is the whole contract between the lora-agg host and an
 * aggregation-strategy plugin. Only C types cross it: no Swift, C++ or Python
 * type, no allocator, no exception. A plugin written in any language that can
 * export a C function works (Templates/CPlugin is one in plain C).
 *
 * GROWTH RULE (how this header changes without breaking anyone)
 *   1. Structs only grow at the end. A field is never removed, reordered or
 *      retyped. New fields are labelled "ABI 1.N and later".
 *   2. Every struct that crosses the boundary starts with `struct_size`, set
 *      by whoever fills the struct. A reader must check `struct_size` before
 *      touching a field that a later minor version appended; a field beyond
 *      the writer's `struct_size` reads as zero / NULL.
 *   3. LORA_AGG_ABI_MINOR grows with every appended field. The host accepts any
 *      plugin with the same LORA_AGG_ABI_MAJOR and a descriptor at least as
 *      large as the 1.0 descriptor; it refuses any other major version.
 *   4. Optional features that do not fit a struct field are reached through
 *      `get_extension("lora-agg.<name>/<n>")`, which returns a pointer to a
 *      versioned extension table or NULL. Unknown identifiers return NULL.
 *   5. Reserved fields and unused capability bits must be zero.
 *   6. LORA_AGG_ABI_MAJOR changes only if one of the rules above cannot hold.
 *
 * CALLING RULES (tags used on every function pointer below)
 *   [any-thread]   may be called from several threads at once, including for
 *                  the same state (the host aggregates modules in parallel).
 *   [main-thread]  called by one thread at a time for a given state, never
 *                  concurrently with any other call on that state.
 *
 * OWNERSHIP
 *   - Inputs (rounds, client factors, config strings) belong to the host and
 *     are valid only during the call. A plugin must not write to them nor keep
 *     pointers to them after the call returns.
 *   - Everything a plugin returns in a lora_agg_result belongs to the plugin
 *     and stays valid until the host passes that result to `free_result`.
 *   - Strings in the descriptor belong to the plugin and live until process
 *     exit (the host never unloads a plugin).
 *   - Nothing is ever freed across the boundary with free(): each side frees
 *     what it allocated.
 *
 * ERRORS
 *   Functions that can fail return a lora_agg_status and write a one-line
 *   message (UTF-8, NUL-terminated, truncated to fit) into the caller-owned
 *   buffer `error`, of `error_capacity` bytes. Plugins never print, abort or
 *   throw across the boundary.
 *
 * MATRICES
 *   All matrices are dense, row-major, Float32, without padding between rows.
 *   LoRA factors follow Hugging Face PEFT: A is rank x d_in, B is d_out x rank,
 *   and a client's weight update is  scaling * B * A  (d_out x d_in).
 */
#ifndef LORA_AGG_H
#define LORA_AGG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Nullability annotations are a clang feature; other compilers (gcc) see nothing. */
#if defined(__has_feature)
#if __has_feature(assume_nonnull)
#define LORA_AGG_HAS_NULLABILITY 1
#endif
#endif
#if defined(LORA_AGG_HAS_NULLABILITY)
#define LORA_AGG_ASSUME_NONNULL_BEGIN _Pragma("clang assume_nonnull begin")
#define LORA_AGG_ASSUME_NONNULL_END _Pragma("clang assume_nonnull end")
#else
#define LORA_AGG_ASSUME_NONNULL_BEGIN
#define LORA_AGG_ASSUME_NONNULL_END
#define _Nullable
#define _Nonnull
#endif

LORA_AGG_ASSUME_NONNULL_BEGIN

/** Major version: a plugin built for another major version is refused. */
#define LORA_AGG_ABI_MAJOR 1
/** Minor version: grows with every appended field; older plugins still load. */
#define LORA_AGG_ABI_MINOR 0
/** The one symbol a plugin exports: `const lora_agg_plugin *lora_agg_plugin_entry(void)`. */
#define LORA_AGG_ENTRY_SYMBOL "lora_agg_plugin_entry"

/** Result of every fallible call. */
typedef enum lora_agg_status {
    LORA_AGG_OK = 0,
    /** The round or a client is malformed: shapes, NaN/Inf, no clients, zero samples. */
    LORA_AGG_INVALID_INPUT = 1,
    /** Valid input this strategy does not handle (for example heterogeneous ranks). */
    LORA_AGG_UNSUPPORTED = 2,
    /** The hyperparameter JSON given to `create` is invalid. */
    LORA_AGG_INVALID_CONFIG = 3,
    /** Saved state could not be restored (wrong strategy, version or bytes). */
    LORA_AGG_INVALID_STATE = 4,
    /** The plugin failed for a reason of its own (allocation, numerical failure). */
    LORA_AGG_INTERNAL_ERROR = 5,
} lora_agg_status;

/** Capability bits of `lora_agg_plugin.capabilities`. Unused bits are zero. */
enum {
    /** Accepts clients of different ranks in one round. */
    LORA_AGG_CAP_HETEROGENEOUS_RANKS = 1u << 0,
    /** Exact: s*B*A + U*V of the result equals sum_k p_k s_k B_k A_k to round-off. */
    LORA_AGG_CAP_EXACT = 1u << 1,
    /** Requires every client to hold the same A (FFA-LoRA style). */
    LORA_AGG_CAP_REQUIRES_SHARED_A = 1u << 2,
    /** May return a residual U*V to be added to the base weight. */
    LORA_AGG_CAP_BASE_RESIDUAL = 1u << 3,
    /** May return one payload per client instead of the global factors' first slots. */
    LORA_AGG_CAP_PER_CLIENT_PAYLOADS = 1u << 4,
    /** Keeps state across rounds; implements save_state / load_state. */
    LORA_AGG_CAP_STATEFUL = 1u << 5,
};

/** One client's LoRA factors for one module. Host-owned, read-only, valid during the call. */
typedef struct lora_agg_client {
    /** sizeof(lora_agg_client) as the host knows it. */
    uint32_t struct_size;
    /** LoRA rank r_k of this client for this module (rows of A, columns of B); >= 1. */
    uint32_t rank;
    /** Number of training samples n_k; weights are n_k / sum over clients present. */
    double samples;
    /** PEFT scaling s_k (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA). */
    double scaling;
    /** A_k: rank x d_in, row-major. */
    const float *a;
    /** B_k: d_out x rank, row-major. */
    const float *b;
    /** A stable client identifier for messages and per-client state; may be NULL. */
    const char *_Nullable client_id;
} lora_agg_client;

/** The clients of one round for one module. Host-owned, read-only, valid during the call. */
typedef struct lora_agg_round {
    /** sizeof(lora_agg_round) as the host knows it. */
    uint32_t struct_size;
    /** Number of entries in `clients`. */
    uint32_t client_count;
    /** Output dimension of the module (rows of B). */
    uint64_t d_out;
    /** Input dimension of the module (columns of A). */
    uint64_t d_in;
    /** The module's name, e.g. "model.layers.0.self_attn.q_proj"; for messages and state keys. */
    const char *module_name;
    /** Round number, counted from 0 by the host; stateful strategies key on it. */
    uint64_t round_index;
    /** `client_count` clients. */
    const lora_agg_client *clients;
} lora_agg_round;

/** Factors returned for one client, when the strategy personalises. Plugin-owned. */
typedef struct lora_agg_client_payload {
    /** sizeof(lora_agg_client_payload) as the plugin knows it. */
    uint32_t struct_size;
    /** Rank of this client's factors. */
    uint32_t rank;
    /** Scaling the client must use with these factors. */
    double scaling;
    /** rank x d_in. */
    float *a;
    /** d_out x rank. */
    float *b;
} lora_agg_client_payload;

/** One named diagnostic number (e.g. "cosine_before"). Plugin-owned. */
typedef struct lora_agg_diagnostic {
    /** Snake-case name, unique within a result. */
    const char *name;
    double value;
} lora_agg_diagnostic;

/**
 * The outcome of aggregating one module. The host zeroes it and sets
 * `struct_size`; the plugin fills it. Every pointer is plugin-owned and valid
 * until `free_result` is called on this result.
 *
 * Effective global update:  scaling * B * A  +  residual_u * residual_v.
 */
typedef struct lora_agg_result {
    /** sizeof(lora_agg_result) as the host knows it (set by the host). */
    uint32_t struct_size;
    /** Rank R of the global factors (may differ from every client's rank). */
    uint32_t rank;
    /** Scaling of the global factors. */
    double scaling;
    /** Global A: rank x d_in (NULL only while the host's zeroed result is unfilled). */
    float *_Nullable a;
    /** Global B: d_out x rank. */
    float *_Nullable b;
    /** Rank q of the factored base-weight residual; 0 when there is none. */
    uint32_t residual_rank;
    /** Residual U: d_out x q (NULL when q = 0). Added to the base weight as U*V, scaling included. */
    float *_Nullable residual_u;
    /** Residual V: q x d_in (NULL when q = 0). */
    float *_Nullable residual_v;
    /**
     * Per-client payloads: 0, or exactly round.client_count entries in the
     * round's client order. When 0, client k receives the first r_k rank
     * slots of the global factors.
     */
    uint32_t client_payload_count;
    lora_agg_client_payload *_Nullable client_payloads;
    /** Named diagnostics. */
    uint32_t diagnostic_count;
    const lora_agg_diagnostic *_Nullable diagnostics;
    /** For the plugin's own bookkeeping (e.g. the allocation to free); the host never reads it. */
    void *_Nullable plugin_private;
} lora_agg_result;

/** A byte buffer returned by a plugin (saved state). Plugin-owned until `free_bytes`. */
typedef struct lora_agg_bytes {
    const uint8_t *_Nullable data;
    uint64_t size;
    void *_Nullable plugin_private;
} lora_agg_bytes;

/**
 * Services the host offers to plugins, passed to `create`. Host-owned, valid
 * until process exit. Grows by the same rule as the descriptor: check
 * `struct_size` before reading a field labelled with a later minor version.
 */
typedef struct lora_agg_host_api {
    /** sizeof(lora_agg_host_api) as the host knows it. */
    uint32_t struct_size;
    uint32_t abi_major;
    uint32_t abi_minor;
    uint32_t reserved;
    /**
     * Thin SVD of a matrix given in factored form, without forming it:
     * M = sum_j w_j * B_j * A_j over `term_count` terms (B_j: d_out x r_j,
     * A_j: r_j x d_in), computed by stacking the factors, QR of each stack and
     * an SVD of the small (sum r_j)^2 core. Writes the top `keep` triplets:
     * u (d_out x keep), sigma (keep, descending), vt (keep x d_in); all
     * caller-owned. `keep` <= min(d_out, d_in, sum r_j). Returns LORA_AGG_OK
     * or an error with a message.                                  [any-thread]
     */
    lora_agg_status (*factored_svd)(uint32_t term_count, const double *weights,
                                    const uint32_t *ranks, const float *_Nonnull const *_Nonnull b_factors,
                                    const float *_Nonnull const *_Nonnull a_factors, uint64_t d_out,
                                    uint64_t d_in, uint32_t keep, float *u, float *sigma,
                                    float *vt, char *error, size_t error_capacity);
    /**
     * Writes one line to the host's log (level 0 debug, 1 info, 2 warning).
     * Plugins must use this instead of printing.                   [any-thread]
     */
    void (*log)(int32_t level, const char *message);
} lora_agg_host_api;

/**
 * The plugin descriptor, returned by the entry symbol. Plugin-owned and
 * immutable, valid until process exit.
 */
typedef struct lora_agg_plugin {
    /** LORA_AGG_ABI_MAJOR the plugin was built against. */
    uint32_t abi_major;
    /** LORA_AGG_ABI_MINOR the plugin was built against. */
    uint32_t abi_minor;
    /** sizeof(lora_agg_plugin) as the plugin knows it; the host tolerates larger. */
    uint32_t struct_size;
    /** Must be zero. */
    uint32_t reserved;
    /** Unique kebab-case strategy name used on the command line, e.g. "fedex-lora". */
    const char *name;
    /** The plugin's own version, semantic versioning, e.g. "1.0.0". */
    const char *version;
    /** One sentence, at most 150 characters. */
    const char *summary;
    /** Paper reference: authors, title, venue or arXiv identifier. */
    const char *citation;
    /** Longer description: update rule, deviations from the paper (may be ""). */
    const char *description;
    /**
     * JSON array describing each hyperparameter:
     * [{"name":..., "type":"number"|"integer"|"string"|"boolean",
     *   "default":..., "minimum":..., "maximum":..., "choices":[...],
     *   "description":...}]. "[]" when there are none.
     */
    const char *parameters_schema;
    /** Bitwise OR of LORA_AGG_CAP_* values. */
    uint64_t capabilities;

    /**
     * Creates a strategy instance from a JSON object of hyperparameters
     * (unknown keys are an error, missing keys take their defaults). `host` is
     * valid until process exit. On success stores an opaque state in *out_state.
     * On failure returns an error status, leaves *out_state NULL and writes a
     * message.                                                    [main-thread]
     */
    lora_agg_status (*create)(const char *config_json, const lora_agg_host_api *host,
                              void *_Nullable *_Nonnull out_state, char *error,
                              size_t error_capacity);
    /**
     * Aggregates one module. `result` is zeroed with struct_size set by the
     * host. On success the plugin fills it and the host later calls
     * free_result. On failure nothing needs freeing and a message is written.
     * Must not modify the round. Deterministic: the same round gives
     * bit-identical results.                                       [any-thread]
     */
    lora_agg_status (*aggregate)(void *state, const lora_agg_round *round,
                                 lora_agg_result *result, char *error,
                                 size_t error_capacity);
    /** Releases everything a successful `aggregate` put in `result`.   [any-thread] */
    void (*free_result)(void *state, lora_agg_result *result);
    /** Destroys a state from `create`; no other call on it is in flight. [main-thread] */
    void (*destroy)(void *state);

    /**
     * Optional (NULL unless LORA_AGG_CAP_STATEFUL): serialises the state kept
     * across rounds (optimizer moments, per-client factors) so the host can
     * store it between rounds and processes. The bytes are plugin-owned until
     * free_bytes.                                                 [main-thread]
     */
    lora_agg_status (*_Nullable save_state)(void *state, lora_agg_bytes *out,
                                            char *error, size_t error_capacity);
    /** Optional: restores bytes written by save_state of the same plugin. [main-thread] */
    lora_agg_status (*_Nullable load_state)(void *state, const uint8_t *data, uint64_t size,
                                            char *error, size_t error_capacity);
    /** Optional: releases bytes returned by save_state.                 [any-thread] */
    void (*_Nullable free_bytes)(void *state, lora_agg_bytes *bytes);
    /**
     * Optional: returns the extension table named `identifier`
     * ("lora-agg.<name>/<n>") or NULL when not supported. Tables are
     * plugin-owned, valid until process exit.                      [any-thread]
     */
    const void *_Nullable (*_Nullable get_extension)(const char *identifier);
} lora_agg_plugin;

/** The type of the entry symbol LORA_AGG_ENTRY_SYMBOL. */
typedef const lora_agg_plugin *_Nullable (*lora_agg_entry_fn)(void);

LORA_AGG_ASSUME_NONNULL_END

#ifdef __cplusplus
}
#endif

#endif /* LORA_AGG_H */
