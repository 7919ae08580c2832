/*
 * residual_patch.c - a patch written in C that applies to any protocol denoiser with a block
 * stack, whichever plugin made it (model protocol, ABI 1.3).
 *
 *     cc -std=c99 -Wall -Werror -shared -fPIC -I plugins/sdk/include \
 *        -o libc_residual_patch.so plugins/examples/c/residual_patch.c
 *
 * The plugin ("c-residual-patch" 1.0.0) registers one node type:
 *
 *   ConstantResidual  model: Model<Denoiser>, value: Float = 0, first: Int = 0, last: Int = -1,
 *                     strength: Float = 1, start: Float = 0, end: Float = 1
 *                                                               ->  model: Model<Denoiser>
 *
 * After each block first..=last of the model's first stack, `value` is added to every entry of
 * the hidden state: a ControlNet-shaped injection (a block residual) reduced to its plumbing.
 * What a patch in C needs, all below:
 * - a hook with the DfBlockResidualFn signature, returning the delta as an owned tensor (the
 *   host scales it by `strength`, gates it by the step window and the guidance branch, and adds
 *   it at `token_offset`);
 * - a DfPatchDesc naming the hook, its range and gates, and the user data the host frees with
 *   `drop_user_data` when the last model holding the patch is gone;
 * - `host->model_patch`, which checks the combination (the model's capabilities, the block
 *   range, overlaps with its other patches) and returns the new model, or NULL with a message.
 * The model's weights are shared: nothing is copied.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ditflow_plugin.h"

typedef struct Residual {
    float value;
} Residual;

static int32_t residual_hook(void* user_data, const DfHostApi* host, const DfCallContext* call,
                             uint32_t stack, uint32_t block, const DfValue* hidden,
                             DfValue** delta, int64_t* token_offset) {
    const Residual* r = (const Residual*)user_data;
    int32_t dtype = 0;
    const int64_t* shape = NULL;
    size_t rank = 0, n = 1, i;
    (void)call;
    (void)stack;
    (void)block;
    if (host->value_tensor_info(hidden, &dtype, &shape, &rank) != DF_OK) {
        host->set_last_error("ConstantResidual: the hidden state is not a tensor");
        return DF_ERROR;
    }
    for (i = 0; i < rank; i++) {
        n *= (size_t)shape[i];
    }
    DfValue* d = host->value_tensor(DF_KIND_TENSOR, DF_DTYPE_F32, shape, rank, NULL, 0);
    float* ds = d ? (float*)host->value_tensor_data_mut(d, NULL) : NULL;
    if (ds == NULL) {
        if (d) {
            host->value_release(d);
        }
        host->set_last_error("ConstantResidual: cannot make the delta");
        return DF_ERROR;
    }
    for (i = 0; i < n; i++) {
        ds[i] = r->value;
    }
    *delta = d;
    *token_offset = 0;
    return DF_OK;
}

static void residual_drop(void* user_data) {
    free(user_data);
}

static const DfPortDesc residual_inputs[] = {
    {.name = "model", .type_expr = "Model<Denoiser>", .doc = "Any denoiser with a block stack.",
     .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
    {.name = "value", .type_expr = "Float", .doc = "Added to every hidden-state entry.",
     .default_json = "0.0", .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
    {.name = "first", .type_expr = "Int", .doc = "First block.", .default_json = "0", .min = 0.0,
     .max = 1e6},
    {.name = "last", .type_expr = "Int", .doc = "Last block (-1: the stack's last).",
     .default_json = "-1", .min = -1.0, .max = 1e6},
    {.name = "strength", .type_expr = "Float", .doc = "Scales the residual.",
     .default_json = "1.0", .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
    {.name = "start", .type_expr = "Float", .doc = "First fraction of the steps it applies in.",
     .default_json = "0.0", .min = 0.0, .max = 1.0},
    {.name = "end", .type_expr = "Float", .doc = "Fraction of the steps where it stops.",
     .default_json = "1.0", .min = 0.0, .max = 1.0},
};

static const DfPortDesc residual_outputs[] = {
    {.name = "model", .type_expr = "Model<Denoiser>", .doc = "The patched model.",
     .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
};

static int32_t residual_execute(void* node_data, const DfHostApi* host, DfContext* ctx) {
    const DfValue *model = host->input(ctx, "model"), *v;
    double value = 0, strength = 1, start = 0, end = 1;
    int64_t first = 0, last = -1;
    char name[64];
    (void)node_data;
    if (model == NULL || (v = host->input(ctx, "value")) == NULL ||
        host->value_get_float(v, &value) != DF_OK || (v = host->input(ctx, "first")) == NULL ||
        host->value_get_int(v, &first) != DF_OK || (v = host->input(ctx, "last")) == NULL ||
        host->value_get_int(v, &last) != DF_OK || (v = host->input(ctx, "strength")) == NULL ||
        host->value_get_float(v, &strength) != DF_OK || (v = host->input(ctx, "start")) == NULL ||
        host->value_get_float(v, &start) != DF_OK || (v = host->input(ctx, "end")) == NULL ||
        host->value_get_float(v, &end) != DF_OK) {
        host->set_error(ctx, "ConstantResidual: bad inputs");
        return DF_ERROR;
    }
    Residual* r = (Residual*)malloc(sizeof(Residual));
    if (r == NULL) {
        host->set_error(ctx, "out of memory");
        return DF_ERROR;
    }
    r->value = (float)value;
    snprintf(name, sizeof name, "ConstantResidual(%g)", value);
    DfPatchDesc p;
    memset(&p, 0, sizeof p);
    p.size = (uint32_t)sizeof p;
    p.name = name; /* copied by the host */
    p.strength = strength;
    p.start = start;
    p.end = end;
    p.stack = 0;
    p.first = (int32_t)first;
    p.last = (int32_t)last;
    memcpy(&p.digest, &value, sizeof p.digest);
    p.digest ^= (uint64_t)first << 32 ^ (uint64_t)(last + 1) << 48 ^ 0x5eed;
    p.user_data = r;
    p.drop_user_data = residual_drop;
    p.block_residual = residual_hook;
    /* model_patch owns `r` from here on, even when it refuses the patch. */
    DfValue* patched = host->model_patch(ctx, model, &p);
    if (patched == NULL) {
        host->set_error(ctx, host->last_error());
        return DF_ERROR;
    }
    if (host->set_output(ctx, "model", patched) != DF_OK) {
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
    desc.type_name = "ConstantResidual";
    desc.category = "patches/examples";
    desc.doc = "A block-residual patch written in C: adds a constant after the chosen blocks of "
               "any denoiser's first stack.";
    desc.inputs = residual_inputs;
    desc.n_inputs = sizeof residual_inputs / sizeof residual_inputs[0];
    desc.outputs = residual_outputs;
    desc.n_outputs = sizeof residual_outputs / sizeof residual_outputs[0];
    desc.execute = residual_execute;
    return host->register_node(reg, &desc);
}

DF_DEFINE_PLUGIN("c-residual-patch", "1.0.0", register_nodes);
