/* The tables of kinds (src/kinds.h) and WATCHER_TEST, which runs a body for every watcher kind
 * on every loop kind from those tables: a new watcher is tested here by adding its table line. */
#include "harness.h"
#include "contract_util.h"

#include "../src/kinds.h"
#include "../src/watcher_internal.h"

#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <sys/wait.h>

extern char **environ;

/* Internal (src/internal.h), visible in the static library the tests link. */
const char *ca__child_watcher_kind(const ca_child_watcher *w);

static int custom_add(ca_child_watcher *w, pid_t pid, ca_child_fn cb, void *arg) { return 0; }
static int custom_remove(ca_child_watcher *w, pid_t pid) { return 0; }
static bool custom_active(ca_child_watcher *w) { return true; }

TEST(kinds_tables_agree_with_the_library)
{
    CHECK(ca__loop_kind_count >= 3);
    for (size_t i = 0; i < ca__loop_kind_count; i++) {
        const ca__loop_kind *k = &ca__loop_kinds[i];
        CHECK(ca__loop_kind_find(k->name) == k);
        CHECK(ca__loop_kind_find(k->cli_name) == k);
        ca_loop *l = NULL;
        int r = k->make(&l);
        if (r == -ENOSYS || r == -EPERM) continue; /* io_uring unavailable here */
        CHECK_OK(r);
        CHECK(strcmp(ca_loop_kind(l), k->name) == 0);
        ca_loop_close(l);
        ca_loop_unref(l);
    }
    CHECK(ca__loop_kind_find("no-such-loop") == NULL);
    CHECK(ca__watcher_kind_count >= 6);
    for (size_t i = 0; i < ca__watcher_kind_count; i++) {
        const ca__watcher_kind *k = &ca__watcher_kinds[i];
        CHECK(ca__watcher_kind_find(k->name) == k);
        int avail = k->available ? k->available() : 0;
        ca_child_watcher *w = NULL;
        int r = k->make(&w);
        /* The probe and the constructor agree. */
        if (avail < 0) {
            CHECK_EQ(r, avail);
            continue;
        }
        CHECK_OK(r);
        CHECK(strcmp(ca__child_watcher_kind(w), k->name) == 0);
        CHECK_EQ(ca__watcher_kind_flags(w), k->flags);
        /* The seam: every built-in is a core plus its kind's hooks, behind the one ops table,
         * and the kind's own table names it as kinds.c does. */
        CHECK(ca__child_watcher_is_builtin(w, NULL));
        CHECK(ca__child_watcher_is_builtin(w, ca__wcore_of(w)->kind));
        CHECK(strcmp(ca__wcore_of(w)->kind->name, k->name) == 0);
        CHECK(ca__wcore_of(w)->kind->close != NULL);
        CHECK(ca__wcore_of(w)->kind->finish != NULL ||
              !(ca__wcore_of(w)->kind->flags & CA__WKIND_OWN_THREAD));
        CHECK_OK(ca_child_watcher_close(w));
        ca_child_watcher_unref(w);
    }
    CHECK(ca__watcher_kind_find("no-such-watcher") == NULL);
    static const ca_child_watcher_ops custom = {
        .add_child_handler = custom_add, .remove_child_handler = custom_remove,
        .is_active = custom_active};
    ca_child_watcher *cw = NULL;
    CHECK_OK(ca_child_watcher_new_custom(&custom, NULL, &cw));
    CHECK(!ca__child_watcher_is_builtin(cw, NULL));
    ca_child_watcher_unref(cw);
    CHECK_EQ(ca__watcher_kind_flags(NULL), 0);
    /* The tests' W_* index (tests/contract_util.h) names every kind of the table, in order. */
    CHECK_EQ(W_COUNT, ca__watcher_kind_count);
    for (int k = 0; k < W_COUNT; k++) CHECK(strcmp(wname[k], ca__watcher_kinds[k].name) == 0);
}

static pid_t spawn_sh(const char *cmd)
{
    char *argv[] = {"sh", "-c", (char *)cmd, NULL};
    pid_t pid = -1;
    int e = posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ);
    if (e) t_fail(__FILE__, __LINE__, "posix_spawn: %s", strerror(e));
    return pid;
}

typedef struct rec {
    atomic_int calls, rc;
    bool zombie; /* the child was still unreaped when the callback ran */
} rec;

static void on_exit_rec(pid_t pid, int rc, void *arg)
{
    rec *r = arg;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    r->zombie = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid;
    atomic_store(&r->rc, rc);
    atomic_fetch_add(&r->calls, 1);
}

static bool both_called(void *arg)
{
    rec *r = arg;
    return atomic_load(&r[0].calls) && atomic_load(&r[1].calls);
}

/* An exit status and a death by signal, each delivered once, on this thread's loop; a watcher
 * that promises it (Uring) calls back before the child is reaped. */
WATCHER_TEST(exit_status_and_signal_once)
{
    rec r[2];
    memset(r, 0, sizeof r);
    CHECK_OK(ca_child_watcher_enter(w));
    pid_t a = spawn_sh("exit 7");
    CHECK_OK(ca_child_watcher_add_child_handler(w, a, on_exit_rec, &r[0]));
    pid_t b = spawn_sh("kill -9 $$");
    CHECK_OK(ca_child_watcher_add_child_handler(w, b, on_exit_rec, &r[1]));
    CHECK_OK(ca_child_watcher_exit(w));
    if (!t_run_until(loop, both_called, r, 10))
        t_fail(__FILE__, __LINE__, "%s: an exit was not delivered", t_watcher_kind);
    t_run_for(loop, 0.02);
    CHECK_EQ(atomic_load(&r[0].calls), 1);
    CHECK_EQ(atomic_load(&r[1].calls), 1);
    CHECK_EQ(atomic_load(&r[0].rc), 7);
    CHECK_EQ(atomic_load(&r[1].rc), -SIGKILL);
    if (t_watcher_keeps_zombie(t_watcher_kind)) CHECK(r[0].zombie && r[1].zombie);
    /* Delivered: removing answers 0. */
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, a), 0);
}

/* A removed handler is never called; the child is then the remover's (reaped here unless the
 * watcher reaps every child). */
WATCHER_TEST(removed_handler_never_called)
{
    rec r;
    memset(&r, 0, sizeof r);
    ca_set_log_handler(NULL, NULL); /* Fast logs the removed child it reaps as unknown */
    pid_t pid = spawn_sh("exit 3");
    CHECK_OK(ca_child_watcher_add_child_handler(w, pid, on_exit_rec, &r));
    CHECK_EQ(ca_child_watcher_remove_child_handler(w, pid), 1);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int e = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT);
    CHECK(e == 0 || errno == ECHILD);
    t_run_for(loop, 0.05);
    CHECK_EQ(atomic_load(&r.calls), 0);
    waitpid(pid, NULL, 0); /* ours, or already reaped (Threaded's thread, Fast) */
}
