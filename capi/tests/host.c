/* A C host program using the embedding API (include/ditflow.h) end to end: load the node
 * plugin, run a YAML graph and its Lua twin with typed inputs and an event callback, read typed
 * outputs, run from two threads at once, cancel, and check the error paths. Frees everything:
 * the test runs it under valgrind (or AddressSanitizer), which must find no leak and no invalid
 * access.
 *
 * usage: host NODES_PLUGIN GRAPHS_DIR OUT_DIR */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include "ditflow.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,       \
                    __LINE__, #cond, ditflow_last_error());                               \
            failures++;                                                                   \
        }                                                                                 \
    } while (0)

static atomic_int node_started = 0;
static atomic_int run_finished = 0;

static void on_event(const char* json, void* user_data) {
    (void)user_data;
    if (strstr(json, "\"event\":\"node_started\"")) {
        atomic_fetch_add(&node_started, 1);
    }
    if (strstr(json, "\"event\":\"run_finished\"")) {
        atomic_fetch_add(&run_finished, 1);
    }
}

/* Runs `graph` with seed/size and returns the caption output (malloc'd) or NULL. */
static char* run_caption(ditflow_session_t* session, const ditflow_graph_t* graph, int64_t seed,
                         const char* out_dir, size_t* executed, size_t* cached) {
    ditflow_args_t* args = ditflow_args_new();
    ditflow_run_options_t opts;
    ditflow_report_t* report = NULL;
    const ditflow_value_t* caption;
    const char* text = NULL;
    char* result = NULL;

    CHECK(ditflow_args_set_int(args, "seed", seed) == DITFLOW_OK);
    CHECK(ditflow_args_set_text(args, "size", "32") == DITFLOW_OK);
    memset(&opts, 0, sizeof opts);
    opts.size = sizeof opts;
    opts.workers = 2;
    opts.out_dir = out_dir;
    opts.on_event = on_event;
    CHECK(ditflow_session_run(session, graph, args, &opts, &report) == DITFLOW_OK);
    ditflow_args_free(args);
    if (report == NULL) {
        return NULL;
    }
    CHECK(ditflow_report_ok(report) == 1);
    CHECK(ditflow_report_output_count(report) == 2);
    if (executed) *executed = ditflow_report_executed_count(report);
    if (cached) *cached = ditflow_report_cached_count(report);
    caption = ditflow_report_output(report, "caption");
    CHECK(caption != NULL);
    CHECK(ditflow_value_get_type(caption) == DITFLOW_VALUE_STRING);
    if (ditflow_value_get_string(caption, &text, NULL) == DITFLOW_OK) {
        result = strdup(text);
    }
    {
        int64_t wrong;
        CHECK(ditflow_value_get_int(caption, &wrong) == DITFLOW_ERR_TYPE);
        CHECK(strstr(ditflow_last_error(), "not a Int") != NULL);
    }
    CHECK(ditflow_report_output(report, "nope") == NULL);
    CHECK(strstr(ditflow_last_error(), "no output 'nope'") != NULL);
    ditflow_report_free(report);
    return result;
}

/* Watching: stop after the first run by triggering the cancel flag from the event callback. */
struct watch_state {
    ditflow_cancel_t* cancel;
    int loaded;
    int finished;
};

static void on_watch_event(const char* json, void* user_data) {
    struct watch_state* w = user_data;
    if (strstr(json, "\"event\":\"graph_loaded\"")) {
        w->loaded++;
    }
    if (strstr(json, "\"event\":\"run_finished\"")) {
        w->finished++;
        ditflow_cancel_trigger(w->cancel);
    }
}

struct thread_job {
    ditflow_session_t* session;
    const ditflow_graph_t* graph;
    int64_t seed;
    const char* out_dir;
    char* caption;
};

static void* thread_main(void* p) {
    struct thread_job* job = p;
    job->caption = run_caption(job->session, job->graph, job->seed, job->out_dir, NULL, NULL);
    return NULL;
}

int main(int argc, char** argv) {
    char path[4096];
    ditflow_runtime_t* rt;
    ditflow_session_t* session;
    ditflow_graph_t *yaml, *lua, *bad;
    char *from_yaml, *from_lua, *again;
    size_t executed = 0, cached = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: host NODES_PLUGIN GRAPHS_DIR OUT_DIR\n");
        return 2;
    }
    /* Memory and VRAM caps far above what these graphs map: set, nothing read back, removed. */
    ditflow_set_max_memory((size_t)1 << 40);
    ditflow_set_max_vram((size_t)1 << 40);
    rt = ditflow_runtime_new();
    CHECK(rt != NULL);
    CHECK(ditflow_runtime_load_plugin(rt, argv[1]) == DITFLOW_OK);
    CHECK(ditflow_runtime_node_type_count(rt) > 10);
    CHECK(ditflow_runtime_load_plugin(rt, "/nonexistent/libnothing.so") == DITFLOW_ERR_PLUGIN);
    CHECK(strstr(ditflow_last_error(), "/nonexistent/libnothing.so") != NULL);
    CHECK(ditflow_weights_streamed_bytes() == 0);
    ditflow_set_max_memory(0);
    ditflow_set_max_vram(0);
    /* GPU activation types: the three names taken, another refused with its name. */
    CHECK(ditflow_set_gpu_activations("bf16") == DITFLOW_OK);
    CHECK(ditflow_set_gpu_activations("f8") == DITFLOW_ERR_INVALID_ARGUMENT);
    CHECK(strstr(ditflow_last_error(), "'f8'") != NULL);
    CHECK(ditflow_set_gpu_activations(NULL) == DITFLOW_ERR_INVALID_ARGUMENT);
    CHECK(ditflow_set_gpu_activations("f32") == DITFLOW_OK);
    session = ditflow_session_new(rt);
    /* The session keeps the runtime alive. */
    ditflow_runtime_free(rt);

    snprintf(path, sizeof path, "%s/noise.yaml", argv[2]);
    yaml = ditflow_graph_from_file(path);
    CHECK(yaml != NULL);
    snprintf(path, sizeof path, "%s/noise.lua", argv[2]);
    lua = ditflow_graph_from_file(path);
    CHECK(lua != NULL);

    from_yaml = run_caption(session, yaml, 7, argv[3], &executed, &cached);
    CHECK(executed == 6 && cached == 0);
    CHECK(atomic_load(&node_started) == 6 && atomic_load(&run_finished) == 1);
    /* The Lua twin gives the same outputs; its nodes come from the cache (same signatures). */
    from_lua = run_caption(session, lua, 7, argv[3], &executed, &cached);
    CHECK(from_yaml && from_lua && strcmp(from_yaml, from_lua) == 0);
    CHECK(cached == 5 && executed == 1); /* SaveImage writes its file every time */
    printf("caption: %s\n", from_yaml ? from_yaml : "(none)");

    /* Two runs at once from two threads on one session. */
    {
        pthread_t threads[2];
        struct thread_job jobs[2] = {{session, yaml, 11, argv[3], NULL}, {session, lua, 12, argv[3], NULL}};
        for (int i = 0; i < 2; i++) CHECK(pthread_create(&threads[i], NULL, thread_main, &jobs[i]) == 0);
        for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
        CHECK(jobs[0].caption && jobs[1].caption && strcmp(jobs[0].caption, jobs[1].caption) != 0);
        again = run_caption(session, lua, 11, argv[3], NULL, NULL);
        CHECK(again && jobs[0].caption && strcmp(again, jobs[0].caption) == 0);
        free(jobs[0].caption);
        free(jobs[1].caption);
        free(again);
    }

    /* Cancelled before it starts: a report comes back, with the status. */
    {
        ditflow_cancel_t* cancel = ditflow_cancel_new();
        ditflow_run_options_t opts;
        ditflow_report_t* report = NULL;
        memset(&opts, 0, sizeof opts);
        opts.size = sizeof opts;
        opts.out_dir = argv[3];
        opts.cancel = cancel;
        ditflow_cancel_trigger(cancel);
        CHECK(ditflow_session_run(session, yaml, NULL, &opts, &report) == DITFLOW_ERR_CANCELLED);
        CHECK(report != NULL && ditflow_report_ok(report) == 0);
        ditflow_report_free(report);
        ditflow_cancel_free(cancel);
    }

    /* Watch a graph file: it runs once, the callback stops the watch. */
    {
        struct watch_state w = {ditflow_cancel_new(), 0, 0};
        ditflow_run_options_t opts;
        memset(&opts, 0, sizeof opts);
        opts.size = sizeof opts;
        opts.out_dir = argv[3];
        opts.on_event = on_watch_event;
        opts.user_data = &w;
        opts.cancel = w.cancel;
        snprintf(path, sizeof path, "%s/noise.lua", argv[2]);
        CHECK(ditflow_session_watch(session, path, NULL, &opts) == DITFLOW_OK);
        CHECK(w.loaded == 1 && w.finished == 1);
        ditflow_cancel_free(w.cancel);
    }

    /* Errors: located graph problems, a wrong input type, NULL handles, a failing node. */
    bad = ditflow_graph_from_yaml("version: 1\nnodes:\n  a: {type: Nope}\n  b: [\n", "bad.yaml", ".");
    CHECK(bad == NULL);
    CHECK(strstr(ditflow_last_error(), "bad.yaml:") != NULL);
    bad = ditflow_graph_from_lua("while true do end", "loop.lua", ".");
    CHECK(bad == NULL && strstr(ditflow_last_error(), "instruction budget") != NULL);
    bad = ditflow_graph_from_yaml("version: 1\nnodes:\n  a: {type: Nope}\n", "typo.yaml", ".");
    CHECK(bad != NULL);
    {
        ditflow_report_t* report = (ditflow_report_t*)1;
        ditflow_args_t* args = ditflow_args_new();
        CHECK(ditflow_session_run(session, bad, NULL, NULL, &report) == DITFLOW_ERR_INVALID_GRAPH);
        CHECK(report == NULL);
        CHECK(strstr(ditflow_last_error(), "typo.yaml:3:") != NULL);
        CHECK(ditflow_args_set_string(args, "seed", "seven") == DITFLOW_OK);
        CHECK(ditflow_session_run(session, yaml, args, NULL, &report) == DITFLOW_ERR_INVALID_GRAPH);
        CHECK(ditflow_session_run(NULL, yaml, NULL, NULL, &report) == DITFLOW_ERR_INVALID_ARGUMENT);
        CHECK(ditflow_session_run(session, yaml, NULL, NULL, NULL) == DITFLOW_ERR_INVALID_ARGUMENT);
        CHECK(ditflow_args_set_int(NULL, "x", 1) == DITFLOW_ERR_INVALID_ARGUMENT);
        ditflow_args_free(args);
    }
    {
        /* A node that fails at run time: the status says so and the report names it. */
        ditflow_graph_t* failing = ditflow_graph_from_yaml(
            "version: 1\nnodes:\n  load: {type: LoadImage, inputs: {path: /nonexistent/picture.png}}\n",
            "failing.yaml", ".");
        ditflow_report_t* report = NULL;
        CHECK(failing != NULL);
        CHECK(ditflow_session_run(session, failing, NULL, NULL, &report) == DITFLOW_ERR_RUN_FAILED);
        CHECK(report != NULL && strstr(ditflow_report_errors(report), "node 'load' (LoadImage)") != NULL);
        ditflow_report_free(report);
        ditflow_graph_free(failing);
    }
    ditflow_graph_free(bad);
    ditflow_graph_free(NULL);
    ditflow_graph_free(yaml);
    ditflow_graph_free(lua);
    ditflow_session_free(session);
    free(from_yaml);
    free(from_lua);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
