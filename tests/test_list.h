/* The registration table that tools/gen-test-list.sh writes for each test file. */
#ifndef CA_TEST_LIST_H
#define CA_TEST_LIST_H
#include <stddef.h>
#include "casyncio.h"
struct t_entry {
    const char *name;
    void (*fn)(void);
    void (*loop_fn)(ca_loop *loop);
    double timeout;
    /* WATCHER_TEST: the body, run for every watcher kind on every loop kind. */
    void (*watcher_fn)(ca_loop *loop, ca_child_watcher *w);
};
extern const char *t_suite_name;
extern const struct t_entry t_list[];
extern const size_t t_count;
#endif
