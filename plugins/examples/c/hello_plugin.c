/*
 * hello_plugin.c - the reference example of a ditflow plugin written in C.
 *
 * Build it as a shared library against the SDK header, for example:
 *
 *     cc -std=c99 -Wall -Werror -shared -fPIC -I plugins/sdk/include \
 *        -o libc_hello.so plugins/examples/c/hello_plugin.c
 *
 * The plugin ("c-hello" 1.0.0) registers two node types:
 *
 *   CGreet  name: String = "world", times: Int = 1 (1..=10)  ->  text: String
 *           "hello, NAME!" repeated `times` times, joined by single spaces.
 *   CScale  x: Float (required), factor: Float = 2.0          ->  y: Float = x * factor
 *   CSoftmaxRamp  n: Int = 4 (1..=4096), temperature: Float = 1.0
 *                                                          ->  y: Tensor<f32, 1>
 *           softmax([0, 1, ..., n-1] / temperature), computed by the host's tensor engine:
 *           the ramp is written in place into a fresh tensor (value_tensor_data_mut), then
 *           `affine` and `softmax` run through tensor_op (ABI 1.1).
 *
 * Things every C plugin author should know, all shown below:
 *
 * - The plugin talks to the host only through the `DfHostApi` function table it is given; it
 *   never links against the host.
 * - `host->input` returns a *borrowed* value: do not release it. Values the host *creates* for
 *   you (`value_string`, `value_float`, ...) are owned by you until you hand them over with
 *   `set_output`, which takes ownership (even when it fails), or release them with
 *   `value_release`.
 * - Every host call that can fail is checked. A node reports a failure by calling
 *   `host->set_error(ctx, message)` and returning DF_ERROR; the host copies the message.
 * - Port and node descriptions can be static data: the host copies everything during
 *   `register_node`.
 * - Port ranges use NaN (DF_UNBOUNDED) for "no bound": a port whose `min`/`max` are left at 0
 *   would only accept 0, so set both on every port.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ditflow_plugin.h"

/* Reports `msg` as the node's error and returns DF_ERROR, so callers can `return fail(...)`. */
static int32_t fail(const DfHostApi* host, DfContext* ctx, const char* msg) {
    host->set_error(ctx, msg);
    return DF_ERROR;
}

/* Hands `value` (owned, or NULL when creating it failed) to output `name`. */
static int32_t emit(const DfHostApi* host, DfContext* ctx, const char* name, DfValue* value) {
    if (value == NULL) {
        return fail(host, ctx, "could not create the output value");
    }
    /* set_output takes ownership of `value` whatever it returns: never release it here. */
    if (host->set_output(ctx, name, value) != DF_OK) {
        return fail(host, ctx, "the host refused the output value");
    }
    return DF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Input helpers: each reads one input, or records an error and returns DF_ERROR.              */
/* ------------------------------------------------------------------------------------------ */

/* Reports "input 'NAME' PROBLEM" as the node's error and returns DF_ERROR. */
static int32_t fail_input(const DfHostApi* host, DfContext* ctx, const char* name,
                          const char* problem) {
    char msg[256];
    /* snprintf truncates safely; the host copies the message, so a stack buffer is fine. */
    snprintf(msg, sizeof msg, "input '%s' %s", name, problem);
    return fail(host, ctx, msg);
}

/* Borrows input `name` as a String: `*ptr` stays valid while the input value lives, which is
 * for the whole execute call. `*len` excludes the terminating NUL. */
static int32_t input_string(const DfHostApi* host, DfContext* ctx, const char* name,
                            const char** ptr, size_t* len) {
    const DfValue* value = host->input(ctx, name); /* borrowed: never release it */
    if (value == NULL) {
        return fail_input(host, ctx, name, "is missing");
    }
    if (host->value_get_string(value, ptr, len) != DF_OK) {
        return fail_input(host, ctx, name, "is not a String");
    }
    return DF_OK;
}

static int32_t input_int(const DfHostApi* host, DfContext* ctx, const char* name, int64_t* out) {
    const DfValue* value = host->input(ctx, name);
    if (value == NULL) {
        return fail_input(host, ctx, name, "is missing");
    }
    if (host->value_get_int(value, out) != DF_OK) {
        return fail_input(host, ctx, name, "is not an Int");
    }
    return DF_OK;
}

static int32_t input_float(const DfHostApi* host, DfContext* ctx, const char* name, double* out) {
    const DfValue* value = host->input(ctx, name);
    if (value == NULL) {
        return fail_input(host, ctx, name, "is missing");
    }
    /* value_get_float also accepts an Int and converts it. */
    if (host->value_get_float(value, out) != DF_OK) {
        return fail_input(host, ctx, name, "is not a number");
    }
    return DF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* CGreet                                                                                      */
/* ------------------------------------------------------------------------------------------ */

#define GREET_MAX_TIMES 10

static const DfPortDesc greet_inputs[] = {
    {
        .name = "name",
        .type_expr = "String",
        .doc = "Who to greet.",
        .default_json = "\"world\"", /* the default is JSON text: a JSON string here */
        .min = DF_UNBOUNDED,
        .max = DF_UNBOUNDED,
    },
    {
        .name = "times",
        .type_expr = "Int",
        .doc = "How many greetings to write.",
        .default_json = "1",
        .min = 1.0,
        .max = (double)GREET_MAX_TIMES,
    },
};

static const DfPortDesc greet_outputs[] = {
    {
        .name = "text",
        .type_expr = "String",
        .doc = "The greetings, separated by single spaces.",
        .min = DF_UNBOUNDED,
        .max = DF_UNBOUNDED,
    },
};

static int32_t greet_execute(void* user_data, const DfHostApi* host, DfContext* ctx) {
    static const char prefix[] = "hello, ";
    static const char suffix[] = "!";
    const size_t prefix_len = sizeof prefix - 1;
    const size_t suffix_len = sizeof suffix - 1;

    const char* name;
    size_t name_len;
    int64_t times;
    size_t greeting_len, total, i;
    char* buffer;
    char* out;
    DfValue* text;

    (void)user_data; /* CGreet registers no user data */

    if (input_string(host, ctx, "name", &name, &name_len) != DF_OK) {
        return DF_ERROR;
    }
    if (input_int(host, ctx, "times", &times) != DF_OK) {
        return DF_ERROR;
    }
    /* The host enforces the declared range, but a plugin should not trust its inputs blindly. */
    if (times < 1 || times > GREET_MAX_TIMES) {
        return fail_input(host, ctx, "times", "must be between 1 and 10");
    }

    /* One greeting is "hello, " NAME "!"; `times` of them plus `times - 1` spaces. Guard the
     * arithmetic against a (absurdly) long name. */
    if (name_len > (SIZE_MAX - 1) / GREET_MAX_TIMES - prefix_len - suffix_len - 1) {
        return fail_input(host, ctx, "name", "is too long");
    }
    greeting_len = prefix_len + name_len + suffix_len;
    total = (size_t)times * greeting_len + ((size_t)times - 1);

    buffer = (char*)malloc(total + 1);
    if (buffer == NULL) {
        return fail(host, ctx, "out of memory");
    }
    out = buffer;
    for (i = 0; i < (size_t)times; i++) {
        if (i > 0) {
            *out++ = ' ';
        }
        /* memcpy with explicit lengths: the name may legitimately contain NUL bytes. */
        memcpy(out, prefix, prefix_len);
        out += prefix_len;
        memcpy(out, name, name_len);
        out += name_len;
        memcpy(out, suffix, suffix_len);
        out += suffix_len;
    }
    *out = '\0';

    /* value_string copies the bytes, so the buffer can be freed straight away. */
    text = host->value_string(buffer, total);
    free(buffer);
    return emit(host, ctx, "text", text);
}

static const DfNodeDesc greet_node = {
    .size = (uint32_t)sizeof(DfNodeDesc),
    .flags = DF_NODE_DETERMINISTIC | DF_NODE_CACHEABLE,
    .type_name = "CGreet",
    .category = "examples",
    .version = NULL, /* use the plugin's version */
    .doc = "Greets `name`, `times` times.",
    .inputs = greet_inputs,
    .n_inputs = sizeof greet_inputs / sizeof greet_inputs[0],
    .outputs = greet_outputs,
    .n_outputs = sizeof greet_outputs / sizeof greet_outputs[0],
    .user_data = NULL,
    .execute = greet_execute,
    .fingerprint = NULL,    /* the inputs alone determine the output */
    .drop_user_data = NULL, /* no user data to free */
};

/* ------------------------------------------------------------------------------------------ */
/* CScale                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static const DfPortDesc scale_inputs[] = {
    {
        .name = "x",
        .type_expr = "Float",
        .doc = "The number to scale.",
        .default_json = NULL, /* NULL: a required input */
        .min = DF_UNBOUNDED,
        .max = DF_UNBOUNDED,
    },
    {
        .name = "factor",
        .type_expr = "Float",
        .doc = "The scale factor.",
        .default_json = "2.0",
        .min = DF_UNBOUNDED,
        .max = DF_UNBOUNDED,
    },
};

static const DfPortDesc scale_outputs[] = {
    {
        .name = "y",
        .type_expr = "Float",
        .doc = "x * factor.",
        .min = DF_UNBOUNDED,
        .max = DF_UNBOUNDED,
    },
};

static int32_t scale_execute(void* user_data, const DfHostApi* host, DfContext* ctx) {
    double x, factor;

    (void)user_data;

    if (input_float(host, ctx, "x", &x) != DF_OK) {
        return DF_ERROR;
    }
    if (input_float(host, ctx, "factor", &factor) != DF_OK) {
        return DF_ERROR;
    }
    return emit(host, ctx, "y", host->value_float(x * factor));
}

static const DfNodeDesc scale_node = {
    .size = (uint32_t)sizeof(DfNodeDesc),
    .flags = DF_NODE_DETERMINISTIC | DF_NODE_CACHEABLE,
    .type_name = "CScale",
    .category = "examples",
    .doc = "Multiplies `x` by `factor`.",
    .inputs = scale_inputs,
    .n_inputs = sizeof scale_inputs / sizeof scale_inputs[0],
    .outputs = scale_outputs,
    .n_outputs = sizeof scale_outputs / sizeof scale_outputs[0],
    .execute = scale_execute,
};

/* ------------------------------------------------------------------------------------------ */
/* CSoftmaxRamp: the tensor engine from C                                                      */
/* ------------------------------------------------------------------------------------------ */

static const DfPortDesc ramp_inputs[] = {
    {
        .name = "n",
        .type_expr = "Int",
        .doc = "The ramp's length.",
        .default_json = "4",
        .min = 1,
        .max = 4096,
    },
    {
        .name = "temperature",
        .type_expr = "Float",
        .doc = "Divides the ramp before the softmax.",
        .default_json = "1.0",
        .min = 1e-6,
        .max = DF_UNBOUNDED,
    },
};

static const DfPortDesc ramp_outputs[] = {
    {
        .name = "y",
        .type_expr = "Tensor<f32, 1>",
        .doc = "softmax(ramp / temperature).",
        .min = DF_UNBOUNDED,
        .max = DF_UNBOUNDED,
    },
};

/* Runs a one-input, one-output op; on failure reports the host's message as the node's error. */
static DfValue* run_op(const DfHostApi* host, DfContext* ctx, const char* op, const DfValue* x,
                       const DfOpAttr* attrs, size_t n_attrs) {
    DfValue* out = NULL;
    size_t n_out = 0;
    const DfValue* inputs[1];
    inputs[0] = x;
    if (host->tensor_op(op, inputs, 1, attrs, n_attrs, 0, &out, 1, &n_out) != DF_OK || n_out != 1) {
        host->set_error(ctx, host->last_error());
        return NULL;
    }
    return out;
}

static int32_t ramp_execute(void* user_data, const DfHostApi* host, DfContext* ctx) {
    int64_t n;
    double temperature;
    int64_t shape[1];
    size_t nbytes = 0;
    float* data;
    DfValue* ramp;
    DfValue* scaled;
    DfValue* y;
    DfOpAttr scale_attrs[1];
    DfOpAttr softmax_attrs[1];
    int64_t i;

    (void)user_data;
    if (input_int(host, ctx, "n", &n) != DF_OK || input_float(host, ctx, "temperature", &temperature) != DF_OK) {
        return DF_ERROR;
    }
    shape[0] = n;
    /* NULL data: a fresh tensor of zeros that this plugin alone owns, so it may write it. */
    ramp = host->value_tensor(DF_KIND_TENSOR, DF_DTYPE_F32, shape, 1, NULL, 0);
    if (ramp == NULL) {
        return fail(host, ctx, "could not make the ramp tensor");
    }
    data = (float*)host->value_tensor_data_mut(ramp, &nbytes);
    if (data == NULL || nbytes != (size_t)n * sizeof(float)) {
        host->value_release(ramp);
        return fail(host, ctx, "the ramp tensor is not writable");
    }
    for (i = 0; i < n; i++) {
        data[i] = (float)i;
    }

    memset(scale_attrs, 0, sizeof scale_attrs);
    scale_attrs[0].name = "mul";
    scale_attrs[0].kind = DF_ATTR_FLOAT;
    scale_attrs[0].f = 1.0 / temperature;
    scaled = run_op(host, ctx, "affine", ramp, scale_attrs, 1);
    host->value_release(ramp);
    if (scaled == NULL) {
        return DF_ERROR;
    }

    memset(softmax_attrs, 0, sizeof softmax_attrs);
    softmax_attrs[0].name = "axis";
    softmax_attrs[0].kind = DF_ATTR_INT;
    softmax_attrs[0].i = -1;
    y = run_op(host, ctx, "softmax", scaled, softmax_attrs, 1);
    host->value_release(scaled);
    if (y == NULL) {
        return DF_ERROR;
    }
    return emit(host, ctx, "y", y);
}

static const DfNodeDesc ramp_node = {
    .size = (uint32_t)sizeof(DfNodeDesc),
    .flags = DF_NODE_DETERMINISTIC | DF_NODE_CACHEABLE,
    .type_name = "CSoftmaxRamp",
    .category = "examples",
    .doc = "softmax([0, 1, ..., n-1] / temperature), computed by the host's tensor engine.",
    .inputs = ramp_inputs,
    .n_inputs = sizeof ramp_inputs / sizeof ramp_inputs[0],
    .outputs = ramp_outputs,
    .n_outputs = sizeof ramp_outputs / sizeof ramp_outputs[0],
    .execute = ramp_execute,
};

/* ------------------------------------------------------------------------------------------ */
/* Registration and the exported descriptor                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Called once by the host when it loads the plugin. The host has already checked the
 * descriptor's ABI version, so every function of this header's ABI is present in `host`. */
static int32_t register_nodes(const DfHostApi* host, DfRegistrar* reg) {
    if (host->register_node(reg, &greet_node) != DF_OK) {
        return DF_ERROR;
    }
    if (host->register_node(reg, &scale_node) != DF_OK) {
        return DF_ERROR;
    }
    if (host->register_node(reg, &ramp_node) != DF_OK) {
        return DF_ERROR;
    }
    return DF_OK;
}

/* Exports `ditflow_plugin_descriptor`, stamped with this header's ABI version. The plugin leaves
 * nothing per-thread behind, so it says the host may unmap it once nothing it made is alive (after
 * a reload); plain DF_DEFINE_PLUGIN keeps a library mapped for the life of the process. */
DF_DEFINE_PLUGIN_FLAGS("c-hello", "1.0.0", register_nodes, DF_PLUGIN_UNLOADABLE);
