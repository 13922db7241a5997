/*
 * A custom policy whose context is not the thread: one event loop shared by the whole
 * process (as a GUI toolkit's main loop is). Worker threads ask the policy for "the" loop and
 * hand work to it with ca_loop_call_soon_threadsafe(); the main thread runs it.
 *
 * Only get_event_loop and set_event_loop are overridden; new_event_loop and the child
 * watcher come from the default policy underneath, through ca_policy_new's base.
 */
#include "casyncio.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define NWORKERS 3

struct shared {
    pthread_mutex_t lock;
    ca_loop *loop; /* a reference, or NULL */
};

static int shared_get_event_loop(ca_policy *self, ca_loop **out)
{
    struct shared *s = ca_policy_data(self);
    pthread_mutex_lock(&s->lock);
    ca_loop *loop = s->loop;
    pthread_mutex_unlock(&s->lock);
    if (!loop) return -ENOENT;
    *out = loop; /* borrowed, as the contract says */
    return 0;
}

static int shared_set_event_loop(ca_policy *self, ca_loop *loop)
{
    struct shared *s = ca_policy_data(self);
    ca_loop_ref(loop);
    pthread_mutex_lock(&s->lock);
    ca_loop *old = s->loop;
    s->loop = loop;
    pthread_mutex_unlock(&s->lock);
    ca_loop_unref(old);
    return 0;
}

static void shared_destroy(ca_policy *self)
{
    struct shared *s = ca_policy_data(self);
    ca_loop_unref(s->loop);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static const ca_policy_ops shared_ops = {
    .get_event_loop = shared_get_event_loop,
    .set_event_loop = shared_set_event_loop,
    .destroy = shared_destroy,
};

static int shared_policy_new(ca_policy **out)
{
    struct shared *s = calloc(1, sizeof *s);
    ca_policy *base = NULL;
    if (!s) return -ENOMEM;
    pthread_mutex_init(&s->lock, NULL);
    int r = ca_default_policy_new(&base);
    if (r == 0) r = ca_policy_new(&shared_ops, s, base, out);
    ca_policy_unref(base);
    if (r < 0) {
        pthread_mutex_destroy(&s->lock);
        free(s);
    }
    return r;
}

/* ----- the program ----------------------------------------------------------------------- */

static int hellos;

static void hello(void *arg)
{
    printf("the shared loop runs work from worker %d\n", (int)(intptr_t)arg);
    if (++hellos == NWORKERS) ca_loop_stop(ca_get_running_loop());
}

static void *worker(void *arg)
{
    ca_loop *loop = NULL;
    /* With the default policy this thread would get -ENOENT; here it gets the shared loop. */
    if (ca_get_event_loop(&loop) == 0) ca_loop_call_soon_threadsafe(loop, hello, arg);
    return NULL;
}

int main(void)
{
    ca_policy *policy = NULL;
    ca_loop *loop = NULL;
    if (shared_policy_new(&policy) < 0) return 1;
    ca_set_event_loop_policy(policy);
    ca_policy_unref(policy);
    if (ca_new_event_loop(&loop) < 0) return 1; /* the base's: an epoll loop */
    ca_set_event_loop(loop);

    pthread_t threads[NWORKERS];
    for (int i = 0; i < NWORKERS; i++)
        if (pthread_create(&threads[i], NULL, worker, (void *)(intptr_t)i) != 0) return 1;
    for (int i = 0; i < NWORKERS; i++) pthread_join(threads[i], NULL);
    ca_loop_run_forever(loop); /* until the last hello stops it */

    ca_set_event_loop(NULL);
    ca_loop_close(loop);
    ca_loop_unref(loop);
    ca_set_event_loop_policy(NULL);
    printf("%d workers, one loop\n", hellos);
    return hellos == NWORKERS ? 0 : 1;
}
