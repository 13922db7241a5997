/* GNU parallel's syntax in `casyncio run`, with the outputs GNU parallel 20221122 gives for the
 * same arguments written in (test_cli_compat.c compares with the real parallel when it is
 * installed; these hold without it). */
#include "cli_run.h"

#include <string.h>
#include <unistd.h>

#define SH_EXIT "sh", "-c", "echo job $1; exit $1", "sh"

TEST(linked_sources_and_positional_strings)
{
    struct res r;
    RUN(&r, "run", "-k", "echo", ":::", "a", "b", "c", ":::+", "1", "2");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "a 1\nb 2\n");
    res_free(&r);
    RUN(&r, "run", "-k", "--link", "echo", ":::", "a", "b", "c", ":::", "1", "2");
    CHECK_STR(r.out, "a 1\nb 2\nc 1\n");
    res_free(&r);
    RUN(&r, "run", "-k", "echo", "{1.}", "{1/}", "{1//}", "{1/.}", "{2}", ":::", "a/b.c", ":::",
        "d/e.f");
    CHECK_STR(r.out, "a/b b.c a b d/e.f\n");
    res_free(&r);
    RUN(&r, "run", "echo", "{10}", "{1}", "{-1}", ":::", "1", ":::", "2", ":::", "3", ":::", "4",
        ":::", "5", ":::", "6", ":::", "7", ":::", "8", ":::", "9", ":::", "10", ":::", "11");
    CHECK_STR(r.out, "10 1 11\n");
    res_free(&r);
    RUN(&r, "run", "-k", "echo", "[{.}]", "[{//}]", ":::", ".bashrc", "a/", "");
    CHECK_STR(r.out, "[] [.]\n[a/] [.]\n[] [.]\n");
    res_free(&r);
}

TEST(several_inputs_per_job)
{
    struct res r;
    /* -n: a word with {} becomes as many words as parallel's shell makes of it. */
    RUN(&r, "run", "-k", "-n2", "printf", "<%s>", "x{}y", ":::", "1", "2", "3");
    CHECK_STR(r.out, "<x1><2y><x3y>");
    res_free(&r);
    /* -N and -X repeat the word per input. */
    RUN(&r, "run", "-k", "-N2", "printf", "<%s>", "x{}y", ":::", "1", "2", "3");
    CHECK_STR(r.out, "<x1y><x2y><x3y>");
    res_free(&r);
    RUN(&r, "run", "-k", "-N2", "echo", "{1}-{2}", ":::", "1", "2", "3");
    CHECK_STR(r.out, "1-2\n3-\n");
    res_free(&r);
    /* -m shares the inputs out between the job slots. */
    RUN(&r, "run", "-k", "-j3", "-m", "echo", ":::", "1", "2", "3", "4", "5", "6", "7", "8", "9",
        "10");
    CHECK_STR(r.out, "1 2 3 4\n5 6 7 8\n9 10\n");
    res_free(&r);
    RUN(&r, "run", "-k", "-j1", "-s", "20", "-m", "echo", ":::", "1", "2", "3", "4", "5", "6",
        "7", "8", "9", "10", "11", "12");
    CHECK_STR(r.out, "1 2 3 4 5 6 7\n8 9 10 11 12\n");
    res_free(&r);
    RUN_IN(&r, "1\n2\n3\n", "run", "-k", "-L2", "echo");
    CHECK_STR(r.out, "1 2\n3\n");
    res_free(&r);
}

TEST(input_records)
{
    struct res r;
    RUN_IN(&r, "a\n\nb\n", "run", "-k", "echo", "[{}]");
    CHECK_STR(r.out, "[a]\n[]\n[b]\n");
    res_free(&r);
    RUN_IN(&r, "a\n\nb\n", "run", "-k", "-r", "echo", "[{}]");
    CHECK_STR(r.out, "[a]\n[b]\n");
    res_free(&r);
    RUN_IN(&r, "a,b,,c", "run", "-k", "-d", ",", "echo", "[{}]");
    CHECK_STR(r.out, "[a]\n[b]\n[]\n[c]\n");
    res_free(&r);
    RUN_IN(&r, "x\ty\na\tb\nc\td\n", "run", "-k", "--header", ":", "--colsep", "\\t", "echo",
           "{y}{x}", "{1}");
    CHECK_STR(r.out, "ba a\ndc c\n");
    res_free(&r);
    RUN_IN(&r, "a\nstop\nb\n", "run", "-k", "-E", "stop", "echo");
    CHECK_STR(r.out, "a\n");
    res_free(&r);
    RUN(&r, "run", "-k", "--tagstring", "T{}-{#}", "echo", "hi", ":::", "a", "b");
    CHECK_STR(r.out, "Ta-1\thi a\nTb-2\thi b\n");
    res_free(&r);
}

TEST(nul_bytes_without_0_are_replaced_with_a_warning)
{
    int in, out, err;
    double t0 = now_s();
    pid_t pid = start_cli((const char *const[]){"run", "-k", "echo", "[{}]", NULL}, &in, &out,
                          &err, -1);
    struct res r;
    memset(&r, 0, sizeof r);
    static const char data[] = "a\0b\nc\n";
    CHECK_EQ(write(in, data, sizeof data - 1), (ssize_t)(sizeof data - 1));
    close(in); /* the input is written: end of file */
    finish_cli(pid, -1, out, err, NULL, &r, t0, 10);
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "[a\\0b]\n[c]\n");
    CHECK_HAS(r.err, "NUL");
    res_free(&r);
}

TEST(exit_statuses_as_gnu_parallel)
{
    struct res r;
    RUN(&r, "run", "--no-such-option", "echo");
    CHECK_EQ(r.status, 255);
    res_free(&r);
    RUN(&r, "run", "--pipe", "wc");
    CHECK_EQ(r.status, 255);
    CHECK_HAS(r.err, "--pipe (GNU parallel option) is not supported");
    res_free(&r);
    RUN(&r, "run", "-j1", "--halt", "now,fail=1", SH_EXIT, ":::", "0", "7", "2");
    CHECK_EQ(r.status, 7);
    res_free(&r);
    RUN(&r, "run", "-j1", "--halt", "soon,success=1", SH_EXIT, ":::", "3", "0", "2");
    CHECK_EQ(r.status, 0);
    res_free(&r);
    RUN(&r, "run", "-j1", "--halt", "now,fail=2", SH_EXIT, ":::", "0", "7", "5", "4");
    CHECK_EQ(r.status, 2);
    res_free(&r);
    RUN(&r, "run", "-j1", "--halt", "now,fail=50%", SH_EXIT, ":::", "0", "7", "5", "4", "5");
    CHECK_EQ(r.status, 60);
    res_free(&r);
    RUN(&r, "run", "-j1", "--halt", "now,done=1", SH_EXIT, ":::", "3", "0");
    CHECK_EQ(r.status, 3);
    res_free(&r);
}

TEST(results_and_resume)
{
    char dir[128], log[128], path[256];
    tmp_path(dir, sizeof dir, "results");
    tmp_path(log, sizeof log, "resume");
    struct res r;
    RUN(&r, "run", "--results", dir, "echo", ":::", "a", "d/e");
    CHECK_EQ(r.status, 0);
    res_free(&r);
    snprintf(path, sizeof path, "%s/1/a/stdout", dir);
    char *s = read_file(path);
    CHECK_STR(s, "a\n");
    free(s);
    snprintf(path, sizeof path, "%s/1/d\\_e/seq", dir);
    s = read_file(path);
    CHECK_STR(s, "2");
    free(s);
    RUN(&r, "run", "-k", "--joblog", log, SH_EXIT, ":::", "0", "1", "0");
    CHECK_EQ(r.status, 1);
    res_free(&r);
    /* --resume-failed runs again what failed, and what the joblog does not have. */
    RUN(&r, "run", "-k", "--joblog", log, "--resume-failed", SH_EXIT, ":::", "0", "1", "0", "2");
    CHECK_EQ(r.status, 2);
    CHECK_STR(r.out, "job 1\njob 2\n");
    res_free(&r);
    RUN(&r, "run", "-k", "--joblog", log, "--resume", SH_EXIT, ":::", "0", "1", "0", "2", "0");
    CHECK_EQ(r.status, 0);
    CHECK_STR(r.out, "job 0\n");
    res_free(&r);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", dir, log);
    CHECK_EQ(system(cmd), 0);
}
