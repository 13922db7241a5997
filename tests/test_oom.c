/*
 * The loop under allocation failure (issue 16.5): malloc is interposed in this test program
 * (a local wrapper over glibc's __libc_malloc) so that a test can make every allocation fail
 * for a while. The sanitizers own malloc, so there the tests skip; the release and debug
 * builds (and valgrind, which replaces __libc_malloc too) run them.
 */
#include "harness.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <time.h>

static atomic_bool fail_malloc;

#ifndef T_SANITIZED
void *__libc_malloc(size_t n);

/* Every malloc of the program, the library's included (it is linked statically here). */
void *malloc(size_t n)
{
    if (atomic_load_explicit(&fail_malloc, memory_order_relaxed)) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_malloc(n);
}
#endif

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double thread_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void *heal_later(void *arg)
{
    struct timespec ts = {0, 400 * 1000 * 1000};
    nanosleep(&ts, NULL);
    atomic_store(&fail_malloc, false);
    return NULL;
}

struct fired {
    ca_loop *loop;
    int n;
};

static void timer_fired(void *arg)
{
    struct fired *f = arg;
    f->n++;
    ca_loop_stop(f->loop);
}

/* A due timer whose move to the ready queue needs memory (a fresh loop has no ring yet):
 * while allocations fail, the loop waits between attempts instead of spinning, and the timer
 * runs once memory is back. */
LOOP_TEST(due_timer_without_memory_does_not_spin) /* timeout: 30 */
{
#ifdef T_SANITIZED
    SKIP("malloc is interposed here, which the sanitizers do not allow");
#endif
    if (strcmp(t_loop_kind, "custom") == 0) SKIP("the custom loop has its own queue");
    struct fired f = {.loop = loop};
    CHECK_OK(ca_loop_call_later(loop, 0.0, timer_fired, &f, NULL));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, heal_later, NULL), 0);
    double cpu0 = thread_cpu_s(), t0 = now_s();
    atomic_store(&fail_malloc, true);
    int r = ca_loop_run_forever(loop);
    atomic_store(&fail_malloc, false);
    double cpu = thread_cpu_s() - cpu0, wall = now_s() - t0;
    pthread_join(t, NULL);
    CHECK_OK(r);
    CHECK_EQ(f.n, 1);
    CHECK(wall >= 0.35);
    /* Spinning costs much of the window (all of it on an idle machine); backing off, a dozen
     * iterations: nothing measurable. */
    if (cpu > 0.05 * wall)
        t_fail(__FILE__, __LINE__, "the loop used %.3fs of CPU in %.3fs", cpu, wall);
}

static void signal_arrived(void *arg)
{
    struct fired *f = arg;
    f->n++;
    ca_loop_stop(f->loop);
}

/* A signal whose handler cannot be queued (the ring cannot grow): it stays pending, and the
 * loop waits between attempts instead of spinning on its own wakeup. */
LOOP_TEST(signal_without_memory_does_not_spin) /* timeout: 30 */
{
#ifdef T_SANITIZED
    SKIP("malloc is interposed here, which the sanitizers do not allow");
#endif
    if (strcmp(t_loop_kind, "custom") == 0) SKIP("the custom loop has no signal handlers");
    struct fired f = {.loop = loop};
    CHECK_OK(ca_loop_add_signal_handler(loop, SIGUSR1, signal_arrived, &f));
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, heal_later, NULL), 0);
    double cpu0 = thread_cpu_s(), t0 = now_s();
    atomic_store(&fail_malloc, true);
    raise(SIGUSR1);
    int r = ca_loop_run_forever(loop);
    atomic_store(&fail_malloc, false);
    double cpu = thread_cpu_s() - cpu0, wall = now_s() - t0;
    pthread_join(t, NULL);
    CHECK_OK(r);
    CHECK_EQ(f.n, 1);
    CHECK(wall >= 0.35);
    if (cpu > 0.05 * wall)
        t_fail(__FILE__, __LINE__, "the loop used %.3fs of CPU in %.3fs", cpu, wall);
    CHECK_EQ(ca_loop_remove_signal_handler(loop, SIGUSR1), 1);
}
