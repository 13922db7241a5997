/*
 * The tables of loop kinds and child watcher kinds (see kinds.h). A new kind is one line here.
 */
#include "internal.h"
#include "kinds.h"

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* What ca_pidfd_child_watcher_new checks: pidfd_open exists (Linux 5.3; not under valgrind). */
static int pidfd_available(void)
{
#ifdef SYS_pidfd_open
    int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (fd >= 0) {
        close(fd);
        return 0;
    }
    return errno == ENOSYS ? -ENOSYS : 0;
#else
    return -ENOSYS;
#endif
}

const ca__loop_kind ca__loop_kinds[] = {
    {.name = "epoll", .cli_name = "epoll", .aliases = {"selector"}, .make = ca_selector_loop_new,
     .make_policy = ca_selector_policy_new},
    {.name = "poll", .cli_name = "poll", .make = ca_poll_loop_new,
     .make_policy = ca_poll_policy_new},
    {.name = "io_uring", .cli_name = "uring", .aliases = {"proactor"},
     .make = ca_proactor_loop_new, .make_policy = ca_proactor_policy_new},
};
const size_t ca__loop_kind_count = sizeof ca__loop_kinds / sizeof ca__loop_kinds[0];

const ca__watcher_kind ca__watcher_kinds[] = {
    {.name = "threaded", .make = ca_threaded_child_watcher_new},
    {.name = "multiloop", .make = ca_multiloop_child_watcher_new},
    {.name = "safe", .make = ca_safe_child_watcher_new, .flags = CA__WK_ATTACH},
    {.name = "fast", .make = ca_fast_child_watcher_new,
     .flags = CA__WK_ATTACH | CA__WK_REAPS_ALL},
    {.name = "pidfd", .make = ca_pidfd_child_watcher_new,
     .available = pidfd_available},
    {.name = "uring", .make = ca_uring_child_watcher_new,
     .available = ca__uring_watcher_available, .flags = CA__WK_NO_PIDFD},
};
const size_t ca__watcher_kind_count = sizeof ca__watcher_kinds / sizeof ca__watcher_kinds[0];

const ca__loop_kind *ca__loop_kind_find(const char *name)
{
    if (!name) return NULL;
    for (size_t i = 0; i < ca__loop_kind_count; i++) {
        const ca__loop_kind *k = &ca__loop_kinds[i];
        if (strcmp(name, k->name) == 0 || strcmp(name, k->cli_name) == 0) return k;
        for (size_t j = 0; j < sizeof k->aliases / sizeof k->aliases[0] && k->aliases[j]; j++)
            if (strcmp(name, k->aliases[j]) == 0) return k;
    }
    return NULL;
}

const ca__watcher_kind *ca__watcher_kind_find(const char *name)
{
    if (!name) return NULL;
    for (size_t i = 0; i < ca__watcher_kind_count; i++)
        if (strcmp(name, ca__watcher_kinds[i].name) == 0) return &ca__watcher_kinds[i];
    return NULL;
}

unsigned ca__watcher_kind_flags(const ca_child_watcher *w)
{
    const ca__watcher_kind *k = ca__watcher_kind_find(ca__child_watcher_kind(w));
    return k ? k->flags : 0;
}
