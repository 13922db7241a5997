/*
 * The one table of loop kinds and the one table of child watcher kinds: name, constructor,
 * availability probe and what the rest of the library needs to know about the kind. Read by
 * the policy, the subprocess code, the command line (--loop, --watcher, `casyncio info`) and
 * the tests (tests/harness.c's LOOP_TEST and WATCHER_TEST), so that a new loop backend or
 * watcher is one new file plus one line here (plus its header prototype and docs).
 *
 * Self-contained (only <casyncio.h>): the command line and the tests include it too; they link
 * the static library, where these internal symbols are visible (hidden visibility only keeps
 * them out of the shared library's exports).
 */
#ifndef CA_KINDS_H
#define CA_KINDS_H

#include "casyncio.h"

#include <stddef.h>

typedef struct ca__loop_kind {
    const char *name;              /* ca_loop_kind's answer: "epoll", "poll", "io_uring" */
    const char *cli_name;          /* the command line's --loop name */
    const char *aliases[3];        /* other names --loop accepts (NULL-terminated) */
    int (*make)(ca_loop **out);
    int (*make_policy)(ca_policy **out);  /* a policy whose loops are of this kind */
} ca__loop_kind;

/* What a watcher kind needs or does, for its users. */
enum {
    /* Works only once attached to a loop (attach_loop), through that loop's SIGCHLD handler:
     * Safe and Fast (a loop without signal handlers, such as a minimal custom one, cannot
     * host them). */
    CA__WK_ATTACH = 1u << 0,
    /* Keeps a child unreaped until its callback ran: a subprocess needs no pidfd to signal it
     * safely, and holds none (Uring). */
    CA__WK_NO_PIDFD = 1u << 1,
    /* Reaps every child of the process (waitpid(-1)), watched or not (Fast). */
    CA__WK_REAPS_ALL = 1u << 2,
};

typedef struct ca__watcher_kind {
    const char *name;              /* ca__child_watcher_kind's answer */
    int (*make)(ca_child_watcher **out);
    /* 0 when the kind can be made here, else why not (-ENOSYS); NULL: always. */
    int (*available)(void);
    unsigned flags;                /* CA__WK_* */
} ca__watcher_kind;

/* In the order the command line and `casyncio info` list them. */
extern const ca__loop_kind ca__loop_kinds[];
extern const size_t ca__loop_kind_count;
extern const ca__watcher_kind ca__watcher_kinds[];
extern const size_t ca__watcher_kind_count;

/* By name (for loops also the command line name or an alias); NULL when unknown. */
const ca__loop_kind *ca__loop_kind_find(const char *name);
const ca__watcher_kind *ca__watcher_kind_find(const char *name);
/* The flags of w's kind (0 for a custom watcher or NULL). */
unsigned ca__watcher_kind_flags(const ca_child_watcher *w);

/* The Uring watcher's availability probe (watcher_uring.c). */
int ca__uring_watcher_available(void);

#endif
