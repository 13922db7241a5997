/*
 * libFuzzer target for the CLI's parsers (docs/testing.md, `make fuzz`): `casyncio run`'s
 * argument parser (parse_run_options), the input reader (input_open/fill/take over records
 * separated by newlines or NULs, several sources combined) and the command builder
 * (cmd_build_argv/cmd_build_display with the replacement strings).
 *
 * Input: the argument words, NUL-separated, then the two bytes 0xff 0xff, then the content of
 * the input file. Every file source the arguments name is replaced by that content (a memfd),
 * so the fuzzer never reads or opens anything else. Only the top-level entry points are used,
 * so that this survives changes inside src/cli.
 */
#include "cli.h"
#include "input.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static int null_fd = -1;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    /* Usage errors are printed on stderr: thousands a second. Keep fd 2 for the sanitizers'
     * reports and send the parser's FILE* stderr to /dev/null instead. */
    FILE *f = fopen("/dev/null", "w");
    if (f) {
        null_fd = fileno(f);
        stderr = f;
    }
    return 0;
}

#define MAX_WORDS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t split = size;
    for (size_t i = 0; i + 1 < size; i++) {
        if (data[i] == 0xff && data[i + 1] == 0xff) {
            split = i;
            break;
        }
    }
    /* The words: copies, each NUL-terminated. */
    char *words = malloc(split + 1);
    if (!words) return 0;
    memcpy(words, data, split);
    words[split] = 0;
    char *argv[MAX_WORDS + 1];
    int argc = 0;
    for (size_t i = 0; i <= split && argc < MAX_WORDS;) {
        argv[argc++] = words + i;
        i += strlen(words + i) + 1;
    }
    if (split == 0) argc = 0;
    argv[argc] = NULL;

    struct run_options o;
    bool help = false;
    if (parse_run_options(argc, argv, &o, &help) != 0 || help) {
        free(words);
        return 0;
    }

    /* The input file: what follows the separator. */
    int fd = memfd_create("fuzz-input", MFD_CLOEXEC);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    if (fd >= 0 && split + 2 < size) {
        const uint8_t *p = data + split + 2;
        size_t n = size - split - 2;
        if (write(fd, p, n) != (ssize_t)n) n = 0;
    }
    for (int i = 0; i < o.nsrc; i++)
        if (o.src[i].file) o.src[i].file = path;
    if (o.nsrc == 0) {
        /* stdin would be read: make the file the one source instead. */
        o.src[0] = (struct source){.file = path};
        o.nsrc = 1;
    }

    struct cmd_template t;
    cmd_template_init(&t, &o);
    struct input in;
    if (fd >= 0 && input_open(&in, &o) == 0) {
        unsigned long seq = 0;
        for (int rounds = 0; rounds < 10000 && !input_done(&in); rounds++) {
            bool oom = false;
            char *rec = input_take(&in, &oom);
            if (!rec) {
                if (oom || input_fill(&in) < 0) break;
                continue;
            }
            seq++;
            struct job_vars v = {.input = rec, .seq = seq, .slot = (int)(seq % 4) + 1};
            char **av = cmd_build_argv(&t, &v);
            char *disp = cmd_build_display(&t, &v);
            free(av);
            free(disp);
            free(rec);
            (void)input_total(&in, seq);
        }
        input_close(&in);
    }
    if (fd >= 0) close(fd);
    free(words);
    return 0;
}
