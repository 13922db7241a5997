/* Allocation counting and fault injection for the sweep: see alloc_wrap.c. */
#ifndef CA_ALLOC_WRAP_H
#define CA_ALLOC_WRAP_H

#include <stdbool.h>

/* How many allocation calls (and pthread_create calls) were made so far. */
long aw_calls(void);
/* Whether the call numbered CA_FAULT_N was reached (and failed). */
bool aw_injected(void);
/* How many blocks made by calls numbered below `before` are still live; *first (may be NULL)
 * receives the lowest such call number. */
long aw_live_before(long before, long *first);

/* The same for blocks that nothing reachable points to any more: the leaks (see alloc_wrap.c).
 * Call it with no other thread running. */
long aw_leaked_before(long before, long *first);

#endif
