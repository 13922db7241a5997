/*
 * Error texts: ca_strerror gives a code's general meaning, ca_strerror_for one that fits the
 * call that returned it (issue 16: a missing program used to read "No such file or directory,
 * or no current event loop"). The texts are checked against real calls' results.
 */
#include "harness.h"

#include <limits.h>

static bool has(const char *s, const char *word) { return s && strstr(s, word) != NULL; }

static bool fut_done(void *f) { return ca_future_done(f); }

TEST(strerror_is_the_general_meaning)
{
    CHECK(strcmp(ca_strerror(-ENOENT), "No such file or directory") == 0);
    CHECK(!has(ca_strerror(-ENOENT), "loop"));
    CHECK(!has(ca_strerror(-EBUSY), "loop"));
    CHECK(has(ca_strerror(-ECHILD), "fork"));
    CHECK(has(ca_strerror(-ENOTCONN), "watcher"));
    CHECK(ca_strerror(EPERM) == ca_strerror(-EPERM));
    CHECK(strcmp(ca_strerror(INT_MIN), "Unknown error") == 0);
}

/* The two messages the issue quotes, from the real calls. */
TEST(strerror_for_fits_the_call)
{
    ca_loop *loop = NULL;
    CHECK_OK(ca_selector_loop_new(&loop));
    static const char *const argv[] = {"/nonexistent/program", NULL};
    const ca_subprocess_options o = {.argv = argv};
    ca_process *p = NULL;
    int r = ca_loop_subprocess_exec(loop, &o, NULL, NULL, &p);
    CHECK_EQ(r, -ENOENT);
    const char *m = ca_strerror_for("ca_loop_subprocess_exec", r);
    CHECK(has(m, "program not found"));
    CHECK(!has(m, "event loop"));
    CHECK(m == ca_strerror_for("loop_subprocess_exec", r)); /* "ca_" is optional */

    /* No current loop in a new policy's non-main thread is the classic ENOENT; here, the main
     * thread after set_event_loop(NULL). */
    CHECK_OK(ca_set_event_loop(NULL));
    ca_loop *cur = NULL;
    r = ca_get_event_loop(&cur);
    CHECK_EQ(r, -ENOENT);
    CHECK(has(ca_strerror_for("ca_get_event_loop", r), "no current event loop"));

    static const char *const cat[] = {"/bin/cat", NULL};
    const ca_subprocess_options piped = {
        .argv = cat, .stdin_mode = CA_PIPE, .stdout_mode = CA_PIPE};
    CHECK_OK(ca_loop_subprocess_exec(loop, &piped, NULL, NULL, &p));
    ca_future *f1 = NULL, *f2 = NULL;
    CHECK_OK(ca_process_communicate(p, "x", 1, &f1));
    r = ca_process_communicate(p, "x", 1, &f2);
    CHECK_EQ(r, -EBUSY);
    m = ca_strerror_for("ca_process_communicate", r);
    CHECK(has(m, "communicate was already called"));
    CHECK(!has(m, "loop"));
    CHECK(t_run_until(loop, fut_done, f1, 10));
    ca_future_unref(f1);
    ca_process_unref(p);

    CHECK(has(ca_strerror_for("ca_loop_call_soon", -EPERM), "another thread"));
    CHECK(has(ca_strerror_for("ca_loop_run_forever", -EBUSY), "already running"));
    CHECK(has(ca_strerror_for("ca_loop_close", -EBUSY), "running"));
    CHECK(has(ca_strerror_for("ca_child_watcher_remove_child_handler", -EBADF),
              "watcher is closed"));
    CHECK(has(ca_strerror_for("ca_loop_call_soon", -EBADF), "event loop is closed"));
    CHECK(has(ca_strerror_for("ca_future_result", -EAGAIN), "not done"));
    CHECK_OK(ca_loop_close(loop));
    ca_loop_unref(loop);
}

TEST(strerror_for_falls_back)
{
    CHECK(ca_strerror_for(NULL, -ENOENT) == ca_strerror(-ENOENT));
    CHECK(ca_strerror_for("no_such_function", -EBUSY) == ca_strerror(-EBUSY));
    /* A code the function gives with its general meaning. */
    CHECK(ca_strerror_for("ca_loop_subprocess_exec", -EMFILE) == ca_strerror(-EMFILE));
    CHECK(ca_strerror_for("ca_loop_call_soon", 0) == ca_strerror(0));
    CHECK(ca_strerror_for("ca_loop_call_soon", INT_MIN) != NULL);
    char longname[300];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    CHECK(ca_strerror_for(longname, -ENOENT) == ca_strerror(-ENOENT));
}
