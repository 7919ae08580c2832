/*
 * newer_minor_plugin.c - a test plugin declaring the next ABI *minor* version.
 *
 * A plugin built against a newer minor may call host functions this host lacks, so the host must
 * refuse to load it, with a message naming both versions, and never call its register function.
 * Used by the host's plugin-loading tests.
 */
#include "ditflow_plugin.h"

/* Registers nothing: the host should never get this far. */
static int32_t register_nothing(const DfHostApi* host, DfRegistrar* reg) {
    (void)host;
    (void)reg;
    return DF_OK;
}

/* Written out by hand: DF_DEFINE_PLUGIN always stamps the header's own version. */
DF_EXTERN_C DF_EXPORT const DfPluginDescriptor ditflow_plugin_descriptor = {
    DF_PLUGIN_MAGIC,
    DF_ABI_MAJOR,
    DF_ABI_MINOR + 1, /* the too-new part */
    (uint32_t)sizeof(DfPluginDescriptor),
    "newer-minor",
    "0.0.1",
    register_nothing,
    0,
    {0}};
