/* `casyncio run` against GNU parallel: runs tests/compat/parallel_compat.sh, which gives the
 * same arguments to both and compares outputs and exit statuses (and checks that the GNU
 * parallel options we do not have are refused by name). Without GNU parallel only the
 * refusals and the messages are checked, and the test says it skipped the rest. */
#include "harness.h"

#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* build/MODE/casyncio, next to build/MODE/tests/ where this test runs from. */
static void cli_path(char *path, size_t n)
{
    ssize_t k = readlink("/proc/self/exe", path, n - 32);
    CHECK(k > 0);
    path[k] = 0;
    char *slash = strrchr(path, '/');
    CHECK(slash != NULL);
    *slash = 0;
    slash = strrchr(path, '/');
    CHECK(slash != NULL);
    strcpy(slash, "/casyncio");
}

/* Runs one section of the script; skips after it when GNU parallel is missing (the script then
 * checked only what needs no parallel). */
static void run_section(const char *section)
{
    bool have_parallel = system("command -v parallel >/dev/null 2>&1") == 0;
    char cli[PATH_MAX];
    cli_path(cli, sizeof cli);
    if (access(cli, X_OK) != 0) t_fail(__FILE__, __LINE__, "%s is not built", cli);
    if (access("tests/compat/parallel_compat.sh", R_OK) != 0)
        SKIP("run from the source tree (tests/compat/parallel_compat.sh)");
    /* Each case of the script runs under timeout(1) too; this bounds the section, and kills
     * what it started if it overruns. */
    const char *argv[] = {"timeout", "-s", "KILL", "170", "sh", "tests/compat/parallel_compat.sh",
                          cli, section, NULL};
    pid_t pid;
    CHECK_EQ(posix_spawnp(&pid, "timeout", NULL, NULL, (char **)argv, environ), 0);
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
    if (!have_parallel) SKIP("GNU parallel is not installed (apt-get install parallel)");
}

TEST(compat_input_syntax) /* timeout: 180 */
{
    run_section("input");
}

TEST(compat_replacement_strings) /* timeout: 180 */
{
    run_section("replace");
}

TEST(compat_several_inputs_per_job) /* timeout: 180 */
{
    run_section("multi");
}

TEST(compat_options) /* timeout: 180 */
{
    run_section("options");
}

TEST(compat_exit_status) /* timeout: 180 */
{
    run_section("exit");
}

TEST(compat_retries_results_resume) /* timeout: 180 */
{
    run_section("files");
}

TEST(compat_refused_by_name) /* timeout: 180 */
{
    run_section("refused");
}

TEST(compat_intended_differences) /* timeout: 180 */
{
    run_section("differences");
}
