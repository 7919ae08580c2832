/* A plugin whose behaviour is set at compile time, for the plugin hot-reload test: the node
 * CVersioned multiplies `x` by FACTOR (pass -DFACTOR=3 to the compiler; 2 by default). */
#include "ditflow_plugin.h"

#ifndef FACTOR
#define FACTOR 2
#endif

static const DfPortDesc inputs[] = {
    {.name = "x", .type_expr = "Float", .doc = "The number.", .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
};

static const DfPortDesc outputs[] = {
    {.name = "y", .type_expr = "Float", .doc = "x * FACTOR.", .min = DF_UNBOUNDED, .max = DF_UNBOUNDED},
};

static int32_t execute(void* user_data, const DfHostApi* host, DfContext* ctx) {
    double x;
    (void)user_data;
    if (host->value_get_float(host->input(ctx, "x"), &x) != DF_OK) {
        host->set_error(ctx, "input 'x' is not a Float");
        return DF_ERROR;
    }
    return host->set_output(ctx, "y", host->value_float(x * FACTOR));
}

static const DfNodeDesc node = {
    .size = (uint32_t)sizeof(DfNodeDesc),
    .flags = DF_NODE_DETERMINISTIC | DF_NODE_CACHEABLE,
    .type_name = "CVersioned",
    .category = "tests",
    .doc = "Multiplies `x` by the FACTOR it was compiled with.",
    .inputs = inputs,
    .n_inputs = 1,
    .outputs = outputs,
    .n_outputs = 1,
    .execute = execute,
};

static int32_t register_nodes(const DfHostApi* host, DfRegistrar* reg) {
    return host->register_node(reg, &node);
}

/* Nothing per-thread is left behind: the host may unmap an old build after a reload. */
DF_DEFINE_PLUGIN_FLAGS("c-versioned", "1.0.0", register_nodes, DF_PLUGIN_UNLOADABLE);
