/*
 * no_descriptor.c - a shared library that is not a ditflow plugin: it exports no
 * `ditflow_plugin_descriptor` symbol. The host must refuse it with a message naming the missing
 * symbol. Used by the host's plugin-loading tests.
 */
#if defined(_WIN32) || defined(__CYGWIN__)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

EXPORT int some_function(void);

EXPORT int some_function(void) {
    return 42;
}
