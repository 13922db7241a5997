/*
 * Four threads, each with its own event loop through the default policy, whose context is
 * the thread: ca_get_event_loop() answers each thread with its own loop. As in asyncio, only
 * the main thread gets a loop made for it on first use; other threads make one with
 * ca_new_event_loop() and set it with ca_set_event_loop().
 */
#include "casyncio.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

#define NTHREADS 4

struct worker {
    int id;
    ca_loop *loop;
    ca_future *done;
    int ticks;
    bool ok;
};

static void tick(void *arg)
{
    struct worker *w = arg;
    /* Inside a callback the running loop is returned, which is this thread's loop. */
    ca_loop *current = NULL;
    if (ca_get_event_loop(&current) != 0 || current != w->loop) w->ok = false;
    if (++w->ticks == 3) ca_future_set_result(w->done, NULL);
    else ca_loop_call_later(w->loop, 0.01, tick, w, NULL);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    ca_loop *current = NULL;
    if (ca_get_event_loop(&current) != -ENOENT) return NULL; /* not the main thread: no loop */
    if (ca_new_event_loop(&w->loop) < 0) return NULL;
    if (ca_set_event_loop(w->loop) < 0 || ca_future_new(w->loop, &w->done) < 0) return NULL;
    w->ok = true;
    ca_loop_call_soon(w->loop, tick, w, NULL);
    if (ca_loop_run_until_complete(w->loop, w->done) < 0) w->ok = false;
    /* Outside callbacks too, the policy gives this thread its own loop. */
    if (ca_get_event_loop(&current) != 0 || current != w->loop) w->ok = false;
    printf("thread %d: %d ticks on its own %s loop %p\n", w->id, w->ticks,
           ca_loop_kind(w->loop), (void *)w->loop);
    ca_set_event_loop(NULL);
    ca_loop_close(w->loop);
    w->done = ca_future_unref(w->done);
    return NULL;
}

int main(void)
{
    pthread_t threads[NTHREADS];
    struct worker workers[NTHREADS] = {{0}};
    for (int i = 0; i < NTHREADS; i++) {
        workers[i].id = i;
        if (pthread_create(&threads[i], NULL, worker_main, &workers[i]) != 0) return 1;
    }
    for (int i = 0; i < NTHREADS; i++) pthread_join(threads[i], NULL);
    int status = 0;
    for (int i = 0; i < NTHREADS; i++) {
        if (!workers[i].ok) status = 1;
        for (int j = 0; j < i; j++)
            if (workers[j].loop == workers[i].loop) status = 1;
    }
    for (int i = 0; i < NTHREADS; i++) ca_loop_unref(workers[i].loop);
    printf("%s\n", status ? "FAILED" : "four threads, four loops");
    return status;
}
