/*
 * gmm_denoiser.c - a denoiser written in C that the standard `Sample` drives (model protocol,
 * ABI 1.3).
 *
 *     cc -std=c99 -Wall -Werror -shared -fPIC -I plugins/sdk/include \
 *        -o libc_gmm_denoiser.so plugins/examples/c/gmm_denoiser.c -lm
 *
 * The plugin ("c-gmm-denoiser" 1.0.0) registers one node type:
 *
 *   GaussianMixtureDenoiser  channels: Int = 4, means: String = "-1;1", std: Float = 0.1
 *                                                               ->  model: Model<Denoiser>
 *
 * The model is the *exact* flow-matching velocity of a Gaussian mixture: the data are
 * x0 ~ N(mu_k, std^2 I) with equal weights, where component k has the same mean mu_k[c] at every
 * position of channel c ("means" lists the components separated by ';', each a comma-separated
 * list of one mean or one per channel). With x_t = (1 - t) x0 + t eps, writing a = 1 - t and
 * v_k = a^2 std^2 + t^2, the posterior weight of component k for a latent row x is
 * r_k ~ exp(-|x - a mu_k|^2 / (2 v_k)) v_k^(-n/2), and
 *
 *     E[eps - x0 | x] = sum_k r_k ((t - a std^2) (x - a mu_k) / v_k - mu_k).
 *
 * So sampling it from noise lands on the mixture: a test checks Sample's output against the same
 * ODE integrated in float64.
 *
 * What a protocol denoiser in C needs, all below:
 * - a DfDenoiserDesc (static data is fine) returned by `describe`;
 * - a `forward` that reads "hidden_states" from its named inputs and the noise level from the
 *   DfCallContext, and writes the prediction as an owned tensor value;
 * - `host->value_model` with DF_INTERFACE_DENOISER and the DfDenoiserApi table.
 * It declares no stacks or capabilities, so block-level patches are refused by the host when
 * they are composed; whole-call patches (feature caches over the whole call) still apply, because
 * the host runs them around any denoiser's forward.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ditflow_plugin.h"

#define MAX_COMPONENTS 16
#define MAX_CHANNELS 64

typedef struct Gmm {
    int64_t channels;
    int n_components;
    double std;
    double means[MAX_COMPONENTS][MAX_CHANNELS];
    DfDenoiserDesc desc;
} Gmm;

static const DfDenoiserDesc* gmm_describe(void* object) {
    return &((Gmm*)object)->desc;
}

static int32_t gmm_fail(const DfHostApi* host, const char* msg) {
    host->set_last_error(msg);
    return DF_ERROR;
}

static int32_t gmm_forward(void* object, const DfHostApi* host, const DfCallContext* call,
                           const DfNamedValue* inputs, size_t n_inputs,
                           const DfPatchDesc* const* patches, size_t n_patches, DfValue** out) {
    const Gmm* g = (const Gmm*)object;
    const DfValue* x = NULL;
    int32_t dtype = 0;
    const int64_t* shape = NULL;
    size_t rank = 0, nbytes = 0, i;
    (void)patches;
    (void)n_patches;
    for (i = 0; i < n_inputs; i++) {
        if (strcmp(inputs[i].name, "hidden_states") == 0) {
            x = inputs[i].value;
        }
    }
    if (x == NULL) {
        return gmm_fail(host, "GaussianMixtureDenoiser: missing input 'hidden_states'");
    }
    if (host->value_tensor_info(x, &dtype, &shape, &rank) != DF_OK || dtype != DF_DTYPE_F32 ||
        rank != 4 || shape[1] != g->channels) {
        return gmm_fail(host, "GaussianMixtureDenoiser: hidden_states must be f32 [B, C, H, W] "
                              "with C the model's channels");
    }
    const float* xs = (const float*)host->value_tensor_data(x, &nbytes);
    if (xs == NULL) {
        return gmm_fail(host, "GaussianMixtureDenoiser: runs on the CPU only");
    }
    const int64_t b = shape[0], c = shape[1], plane = shape[2] * shape[3];
    const int64_t n = c * plane;
    DfValue* y = host->value_tensor(DF_KIND_TENSOR, DF_DTYPE_F32, shape, rank, NULL, 0);
    float* ys = y ? (float*)host->value_tensor_data_mut(y, NULL) : NULL;
    if (ys == NULL) {
        if (y) {
            host->value_release(y);
        }
        return gmm_fail(host, "GaussianMixtureDenoiser: cannot make the output tensor");
    }
    const double t = call->sigma, a = 1.0 - t;
    const double s2 = g->std * g->std;
    const double var = a * a * s2 + t * t;
    int64_t row, k, ch, p;
    for (row = 0; row < b; row++) {
        const float* xr = xs + row * n;
        float* yr = ys + row * n;
        double logr[MAX_COMPONENTS], best = -INFINITY, total = 0.0;
        for (k = 0; k < g->n_components; k++) {
            double d2 = 0.0;
            for (ch = 0; ch < c; ch++) {
                for (p = 0; p < plane; p++) {
                    double d = xr[ch * plane + p] - a * g->means[k][ch];
                    d2 += d * d;
                }
            }
            logr[k] = -0.5 * d2 / var; /* equal weights and variances: the rest cancels */
            if (logr[k] > best) {
                best = logr[k];
            }
        }
        for (k = 0; k < g->n_components; k++) {
            logr[k] = exp(logr[k] - best);
            total += logr[k];
        }
        for (ch = 0; ch < c; ch++) {
            for (p = 0; p < plane; p++) {
                double v = 0.0, xv = xr[ch * plane + p];
                for (k = 0; k < g->n_components; k++) {
                    double mu = g->means[k][ch];
                    v += logr[k] / total * ((t - a * s2) * (xv - a * mu) / var - mu);
                }
                yr[ch * plane + p] = (float)v;
            }
        }
    }
    *out = y;
    return DF_OK;
}

static const DfDenoiserApi gmm_api = {
    .size = (uint32_t)sizeof(DfDenoiserApi),
    .version = 1,
    .describe = gmm_describe,
    .forward = gmm_forward,
};

static void gmm_drop(void* object) {
    free(object);
}

/* Parses "m;m;..." where each m is "v" or "v0,v1,...,v{C-1}". */
static int parse_means(Gmm* g, const char* text, char* err, size_t err_len) {
    const char* s = text;
    g->n_components = 0;
    while (*s) {
        int64_t ch = 0;
        if (g->n_components == MAX_COMPONENTS) {
            snprintf(err, err_len, "input 'means': at most %d components", MAX_COMPONENTS);
            return 0;
        }
        for (;;) {
            char* end = NULL;
            double v = strtod(s, &end);
            if (end == s) {
                snprintf(err, err_len, "input 'means': expected a number at \"%.20s\"", s);
                return 0;
            }
            if (ch < MAX_CHANNELS) {
                g->means[g->n_components][ch] = v;
            }
            ch++;
            s = end;
            if (*s == ',') {
                s++;
                continue;
            }
            break;
        }
        if (ch == 1) {
            for (ch = 1; ch < g->channels; ch++) {
                g->means[g->n_components][ch] = g->means[g->n_components][0];
            }
        } else if (ch != g->channels) {
            snprintf(err, err_len, "input 'means': a component has %lld means for %lld channels",
                     (long long)ch, (long long)g->channels);
            return 0;
        }
        g->n_components++;
        if (*s == ';') {
            s++;
        } else if (*s) {
            snprintf(err, err_len, "input 'means': unexpected \"%.20s\"", s);
            return 0;
        }
    }
    if (g->n_components == 0) {
        snprintf(err, err_len, "input 'means': no components");
        return 0;
    }
    return 1;
}

static const DfPortDesc gmm_inputs[] = {
    {.name = "channels", .type_expr = "Int", .doc = "Latent channels.", .default_json = "4",
     .min = 1.0, .max = (double)MAX_CHANNELS},
    {.name = "means", .type_expr = "String",
     .doc = "Component means: ';'-separated, each one number or one per channel.",
     .default_json = "\"-1;1\"", .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
    {.name = "std", .type_expr = "Float", .doc = "Each component's standard deviation.",
     .default_json = "0.1", .min = 0.001, .max = 100.0},
};

static const DfPortDesc gmm_outputs[] = {
    {.name = "model", .type_expr = "Model<Denoiser>", .doc = "The exact mixture denoiser.",
     .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
};

static int32_t gmm_execute(void* user_data, const DfHostApi* host, DfContext* ctx) {
    const DfValue* v;
    const char* means = NULL;
    size_t len = 0;
    char err[160];
    Gmm* g = (Gmm*)calloc(1, sizeof(Gmm));
    (void)user_data;
    if (g == NULL) {
        host->set_error(ctx, "out of memory");
        return DF_ERROR;
    }
    if ((v = host->input(ctx, "channels")) == NULL || host->value_get_int(v, &g->channels) != DF_OK ||
        (v = host->input(ctx, "std")) == NULL || host->value_get_float(v, &g->std) != DF_OK ||
        (v = host->input(ctx, "means")) == NULL ||
        host->value_get_string(v, &means, &len) != DF_OK) {
        free(g);
        host->set_error(ctx, "GaussianMixtureDenoiser: bad inputs");
        return DF_ERROR;
    }
    if (!parse_means(g, means, err, sizeof err)) {
        free(g);
        host->set_error(ctx, err);
        return DF_ERROR;
    }
    g->desc.size = (uint32_t)sizeof(DfDenoiserDesc);
    g->desc.prediction = DF_PREDICTION_FLOW;
    g->desc.latent_layout = "BCHW";
    g->desc.latent_channels = g->channels;
    g->desc.patch_size = 1;
    g->desc.conditioning = "";
    /* value_model owns `g` from here on, even when it fails. */
    DfValue* model = host->value_model(ctx, DF_INTERFACE_DENOISER, &gmm_api,
                                       "c-gmm.denoiser", g, gmm_drop);
    if (model == NULL) {
        host->set_error(ctx, host->last_error());
        return DF_ERROR;
    }
    if (host->set_output(ctx, "model", model) != DF_OK) {
        host->set_error(ctx, "the host refused the output value");
        return DF_ERROR;
    }
    return DF_OK;
}

static int32_t register_nodes(const DfHostApi* host, DfRegistrar* reg) {
    DfNodeDesc desc;
    memset(&desc, 0, sizeof desc);
    desc.size = (uint32_t)sizeof desc;
    desc.flags = DF_NODE_DETERMINISTIC | DF_NODE_CACHEABLE;
    desc.type_name = "GaussianMixtureDenoiser";
    desc.category = "models/examples";
    desc.doc = "The exact flow-matching denoiser of a Gaussian mixture, written in C.";
    desc.inputs = gmm_inputs;
    desc.n_inputs = sizeof gmm_inputs / sizeof gmm_inputs[0];
    desc.outputs = gmm_outputs;
    desc.n_outputs = sizeof gmm_outputs / sizeof gmm_outputs[0];
    desc.execute = gmm_execute;
    return host->register_node(reg, &desc);
}

DF_DEFINE_PLUGIN("c-gmm-denoiser", "1.0.0", register_nodes);
