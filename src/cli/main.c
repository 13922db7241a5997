/* The casyncio command: `casyncio run` (a parallel job runner), `casyncio info`. */
#include "cli.h"

#include <string.h>

static void print_usage(FILE *f)
{
    fputs("usage: casyncio run [OPTIONS] [--] [COMMAND [ARG...]] [::: INPUT...]\n"
          "       casyncio info\n"
          "       casyncio --help | --version\n"
          "\n"
          "  run    run COMMAND once per input, many at once (see casyncio run --help)\n"
          "  info   the kernel, the event loops and child watchers that work here, the defaults\n"
          "\n"
          "examples:\n"
          "  casyncio run gzip -9 ::: *.log          compress files, one job per CPU\n"
          "  find . -name '*.wav' | casyncio run -j 8 --bar lame {} {.}.mp3\n"
          "  casyncio run --timeout 60 --joblog log.tsv < commands.txt\n",
          f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        print_usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "-V") == 0 || strcmp(cmd, "version") == 0) {
        printf("casyncio %s (libcasyncio %s)\n", CA_VERSION_STRING, ca_version());
        return 0;
    }
    if (strcmp(cmd, "info") == 0) return info_main(argc - 2, argv + 2);
    if (strcmp(cmd, "run") == 0) {
        struct run_options o;
        bool help;
        int r = parse_run_options(argc - 2, argv + 2, &o, &help);
        if (r) return r;
        if (help) {
            print_run_usage(stdout);
            return 0;
        }
        return run_main(&o);
    }
    fprintf(stderr, "casyncio: unknown command '%s'\n", cmd);
    print_usage(stderr);
    return CLI_EXIT_USAGE;
}
