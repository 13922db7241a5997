/*
 * The custom policy of Python's asyncio-policy documentation, in C:
 *
 *     class MyEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
 *         def get_event_loop(self):
 *             loop = super().get_event_loop()
 *             # Do something with loop ...
 *             return loop
 *     asyncio.set_event_loop_policy(MyEventLoopPolicy())
 *
 * "Subclassing" is ca_policy_new with the default policy as base: the ops left NULL fall
 * through to it, and an override calls super with ca_policy_base(self).
 */
#include "casyncio.h"

#include <stdio.h>

static int my_get_event_loop(ca_policy *self, ca_loop **out)
{
    int r = ca_policy_get_event_loop(ca_policy_base(self), out); /* super().get_event_loop() */
    if (r == 0) ++*(int *)ca_policy_data(self);                   /* Do something with loop ... */
    return r;
}

static const ca_policy_ops my_ops = {.get_event_loop = my_get_event_loop};

int main(void)
{
    static int calls;
    ca_policy *base = NULL, *mine = NULL;
    if (ca_default_policy_new(&base) < 0 || ca_policy_new(&my_ops, &calls, base, &mine) < 0)
        return 1;
    ca_policy_unref(base);          /* mine holds its base */
    ca_set_event_loop_policy(mine); /* asyncio.set_event_loop_policy(MyEventLoopPolicy()) */
    ca_policy_unref(mine);          /* and the process holds mine */

    /* In the main thread, the default policy makes the loop on first use. */
    ca_loop *loop = NULL;
    int r = ca_get_event_loop(&loop);
    if (r < 0) {
        fprintf(stderr, "get_event_loop: %s\n", ca_strerror(r));
        return 1;
    }
    printf("MyEventLoopPolicy.get_event_loop ran %d time(s); the loop's kind: %s\n", calls,
           ca_loop_kind(loop));
    ca_loop_close(loop);
    ca_set_event_loop(NULL);        /* the policy drops its loop */
    ca_set_event_loop_policy(NULL); /* back to a default policy: mine is freed */
    return calls == 1 ? 0 : 1;
}
