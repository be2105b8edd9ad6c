/*
 * template-c — a lora-agg strategy plugin in plain C, against lora_agg.h only.
 * `lora-agg new-plugin NAME --language c` copies this folder and renames it.
 *
 * Rule (FedIT: federated averaging of A and B separately):
 *     p_k = n_k / sum_j n_j,   c_k = sqrt(s_k / s)   (s: common scaling)
 *     A = sum_k p_k c_k A_k,   B = sum_k p_k c_k B_k
 *
 * A C plugin validates its own input: the host checks shapes before calling,
 * but rank, samples, scalings and NaN/Inf are this file's job.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_agg.h"

/* The instance behind `void *state`. This rule needs no settings. */
typedef struct template_state {
    int unused;
} template_state;

static void set_error(char *error, size_t capacity, const char *format, ...) {
    if (capacity == 0) return;
    va_list args;
    va_start(args, format);
    vsnprintf(error, capacity, format, args);
    va_end(args);
}

static lora_agg_status create(const char *config_json, const lora_agg_host_api *host,
                              void **out_state, char *error, size_t error_capacity) {
    (void)host;
    *out_state = NULL;
    /* This strategy takes no hyperparameters: accept only an empty object. */
    const char *p = config_json;
    while (*p == ' ' || *p == '\n' || *p == '\t') p++;
    if (*p != '\0' && strncmp(p, "{}", 2) != 0) {
        set_error(error, error_capacity, "unrecognized parameters '%s': this strategy takes no parameters", config_json);
        return LORA_AGG_INVALID_CONFIG;
    }
    template_state *state = calloc(1, sizeof *state);
    if (!state) {
        set_error(error, error_capacity, "out of memory");
        return LORA_AGG_INTERNAL_ERROR;
    }
    *out_state = state;
    return LORA_AGG_OK;
}

static int all_finite(const float *values, size_t count) {
    for (size_t i = 0; i < count; i++)
        if (!isfinite(values[i])) return 0;
    return 1;
}

static lora_agg_status aggregate(void *state, const lora_agg_round *round, lora_agg_result *result,
                                 char *error, size_t error_capacity) {
    (void)state;
    const char *module = round->module_name;
    if (round->client_count == 0) {
        set_error(error, error_capacity, "module '%s': no clients in the round", module);
        return LORA_AGG_INVALID_INPUT;
    }
    const uint32_t rank = round->clients[0].rank;
    double total = 0, common = round->clients[0].scaling;
    int same_scaling = 1;
    for (uint32_t k = 0; k < round->client_count; k++) {
        const lora_agg_client *c = &round->clients[k];
        const char *id = c->client_id ? c->client_id : "?";
        if (c->rank == 0 || c->rank != rank) {
            set_error(error, error_capacity,
                      c->rank == 0 ? "module '%s', client '%s': rank is 0"
                                   : "module '%s', client '%s': rank %u differs from %u; template-c needs equal ranks",
                      module, id, c->rank, rank);
            return c->rank == 0 ? LORA_AGG_INVALID_INPUT : LORA_AGG_UNSUPPORTED;
        }
        if (!(isfinite(c->samples) && c->samples >= 0) || !(isfinite(c->scaling) && c->scaling > 0)) {
            set_error(error, error_capacity, "module '%s', client '%s': invalid samples or scaling", module, id);
            return LORA_AGG_INVALID_INPUT;
        }
        if (!all_finite(c->a, (size_t)rank * round->d_in) || !all_finite(c->b, (size_t)round->d_out * rank)) {
            set_error(error, error_capacity, "module '%s', client '%s': factors contain NaN or infinite values", module, id);
            return LORA_AGG_INVALID_INPUT;
        }
        total += c->samples;
        same_scaling &= c->scaling == common;
    }
    if (!(total > 0)) {
        set_error(error, error_capacity, "module '%s': total sample count is 0", module);
        return LORA_AGG_INVALID_INPUT;
    }
    if (!same_scaling) {
        common = 0;
        for (uint32_t k = 0; k < round->client_count; k++)
            common += round->clients[k].samples / total * round->clients[k].scaling;
    }
    const size_t a_count = (size_t)rank * round->d_in, b_count = (size_t)round->d_out * rank;
    float *a = calloc(a_count, sizeof(float)), *b = calloc(b_count, sizeof(float));
    if (!a || !b) {
        free(a);
        free(b);
        set_error(error, error_capacity, "out of memory");
        return LORA_AGG_INTERNAL_ERROR;
    }
    for (uint32_t k = 0; k < round->client_count; k++) {
        const lora_agg_client *c = &round->clients[k];
        const double rescale = c->scaling == common ? 1.0 : sqrt(c->scaling / common);
        const float w = (float)(c->samples / total * rescale);
        for (size_t i = 0; i < a_count; i++) a[i] += w * c->a[i];
        for (size_t i = 0; i < b_count; i++) b[i] += w * c->b[i];
    }
    result->rank = rank;
    result->scaling = common;
    result->a = a;
    result->b = b;
    return LORA_AGG_OK;
}

static void free_result(void *state, lora_agg_result *result) {
    (void)state;
    free(result->a);
    free(result->b);
    result->a = result->b = NULL;
}

static void destroy(void *state) { free(state); }

static const lora_agg_plugin descriptor = {
    .abi_major = LORA_AGG_ABI_MAJOR,
    .abi_minor = LORA_AGG_ABI_MINOR,
    .struct_size = sizeof(lora_agg_plugin),
    .reserved = 0,
    .name = "template-c",
    .version = "0.1.0",
    .summary = "Averages A and B by sample count, written in C to show the ABI is language-neutral.",
    .citation = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, arXiv:2305.05644",
    .description = "A template: FedIT-style factor averaging in plain C.",
    .parameters_schema = "[]",
    .capabilities = 0,
    .create = create,
    .aggregate = aggregate,
    .free_result = free_result,
    .destroy = destroy,
    .save_state = NULL,
    .load_state = NULL,
    .free_bytes = NULL,
    .get_extension = NULL,
};

/* The one exported symbol. */
__attribute__((visibility("default"))) const lora_agg_plugin *lora_agg_plugin_entry(void) {
    return &descriptor;
}
