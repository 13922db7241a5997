/* Turning COMMAND and one input into what is executed: replacement strings ({} and GNU
 * parallel's {.} {/} {//} {/.} {#} {%}), the shell script for --shell, and quoting. */
#include "cli.h"

#include <stdlib.h>
#include <string.h>

/* The replacement strings, longest first so that "{/.}" is not read as "{/}". */
enum repl { R_NONE, R_INPUT, R_NOEXT, R_BASE, R_DIR, R_BASE_NOEXT, R_SEQ, R_SLOT, R_POS };
static const struct {
    const char *s;
    enum repl r;
} repls[] = {
    {"{//}", R_DIR}, {"{/.}", R_BASE_NOEXT}, {"{}", R_INPUT}, {"{.}", R_NOEXT},
    {"{/}", R_BASE}, {"{#}", R_SEQ},         {"{%}", R_SLOT},
};

/* Matches a replacement string at p: its kind, its length and, for {N}, N. */
static enum repl match_repl(const char *p, size_t *len, int *pos)
{
    if (p[1] >= '1' && p[1] <= '9' && p[2] == '}') {
        *pos = p[1] - '0';
        *len = 3;
        return R_POS;
    }
    for (size_t i = 0; i < sizeof repls / sizeof repls[0]; i++) {
        size_t n = strlen(repls[i].s);
        if (strncmp(p, repls[i].s, n) == 0) {
            *len = n;
            return repls[i].r;
        }
    }
    return R_NONE;
}

void cmd_template_init(struct cmd_template *t, const struct run_options *o)
{
    t->tok = o->cmd;
    t->ntok = o->ncmd;
    t->shell = o->shell;
    t->input_is_script = o->ncmd == 0;
    t->append_input = !t->input_is_script;
    t->multi = o->nsrc > 1;
    for (int i = 0; i < t->ntok; i++) {
        for (const char *p = strchr(t->tok[i], '{'); p; p = strchr(p + 1, '{')) {
            size_t n;
            int pos;
            if (match_repl(p, &n, &pos) != R_NONE) t->append_input = false;
        }
    }
}

static bool safe_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           strchr("_-./:=+,@%^", c) != NULL;
}

bool shell_quote(struct buf *b, const char *s)
{
    bool plain = *s != 0;
    for (const char *p = s; *p && plain; p++) plain = safe_char(*p);
    if (plain) return buf_adds(b, s);
    bool ok = buf_addc(b, '\'');
    for (const char *p = s; *p && ok; p++)
        ok = *p == '\'' ? buf_adds(b, "'\\''") : buf_addc(b, *p);
    return ok && buf_addc(b, '\'');
}

/* Value n (from 1) of an input made of several: a (pointer, length) slice, empty if absent. */
static void nth_value(const char *in, int n, const char **p, size_t *len)
{
    for (; n > 1 && in; n--) {
        in = strchr(in, CLI_VALUE_SEP);
        if (in) in++;
    }
    if (!in) {
        *p = "";
        *len = 0;
        return;
    }
    const char *end = strchr(in, CLI_VALUE_SEP);
    *p = in;
    *len = end ? (size_t)(end - in) : strlen(in);
}

/* An input's text for {} and friends: several values are joined by spaces. */
static bool add_joined(struct buf *b, const char *in)
{
    for (const char *p = in; *p; p++)
        if (!buf_addc(b, *p == CLI_VALUE_SEP ? ' ' : *p)) return false;
    return true;
}

/* The value of one replacement string. */
static bool add_value(struct buf *b, enum repl r, int pos, const struct cmd_template *t,
                      const struct job_vars *v, bool quote)
{
    struct buf joined = {0};
    const char *in = v->input;
    if (t->multi && r != R_POS) {
        if (!add_joined(&joined, in) || !buf_addc(&joined, 0)) {
            buf_free(&joined);
            return false;
        }
        in = joined.p;
    }
    const char *slash = strrchr(in, '/');
    const char *base = slash ? slash + 1 : in;
    const char *dot = strrchr(base, '.');
    if (dot == base) dot = NULL; /* ".bashrc" has no extension */
    char num[32];
    struct buf tmp = {0};
    bool ok = true;
    switch (r) {
    case R_INPUT: ok = buf_adds(&tmp, in); break;
    case R_NOEXT: ok = buf_add(&tmp, in, dot ? (size_t)(dot - in) : strlen(in)); break;
    case R_BASE: ok = buf_adds(&tmp, base); break;
    case R_BASE_NOEXT: ok = buf_add(&tmp, base, dot ? (size_t)(dot - base) : strlen(base)); break;
    case R_DIR:
        if (!slash) ok = buf_adds(&tmp, ".");
        else if (slash == in) ok = buf_adds(&tmp, "/");
        else ok = buf_add(&tmp, in, (size_t)(slash - in));
        break;
    case R_SEQ:
        snprintf(num, sizeof num, "%lu", v->seq);
        ok = buf_adds(&tmp, num);
        break;
    case R_SLOT:
        snprintf(num, sizeof num, "%d", v->slot);
        ok = buf_adds(&tmp, num);
        break;
    case R_POS: {
        const char *p;
        size_t n;
        if (t->multi) nth_value(in, pos, &p, &n);
        else if (pos == 1) p = in, n = strlen(in);
        else p = "", n = 0;
        ok = buf_add(&tmp, p, n);
        break;
    }
    case R_NONE: break;
    }
    ok = ok && buf_addc(&tmp, 0);
    if (ok) ok = quote ? shell_quote(b, tmp.p) : buf_adds(b, tmp.p);
    buf_free(&tmp);
    buf_free(&joined);
    return ok;
}

static bool add_replaced(struct buf *b, const char *tok, const struct cmd_template *t,
                         const struct job_vars *v, bool quote)
{
    const char *p = tok;
    while (*p) {
        const char *q = strchr(p, '{');
        if (!q) return buf_adds(b, p);
        size_t n;
        int pos = 0;
        enum repl r = match_repl(q, &n, &pos);
        if (!buf_add(b, p, (size_t)(q - p))) return false;
        if (r == R_NONE) {
            if (!buf_addc(b, '{')) return false;
            p = q + 1;
        } else {
            if (!add_value(b, r, pos, t, v, quote)) return false;
            p = q + n;
        }
    }
    return true;
}

/* Appends the input as arguments: each value (one, or one per source) after a space, quoted
 * (for a shell) or NUL-terminated (for an argv). Returns how many, -1 on ENOMEM. */
static int add_input_args(struct buf *b, const struct cmd_template *t, const char *in, bool quote)
{
    int n = 0;
    for (int k = 1;; k++) {
        const char *p = in;
        size_t len = strlen(in);
        if (t->multi) nth_value(in, k, &p, &len);
        char *one = strndup(p, len);
        bool ok = one && (quote ? buf_addc(b, ' ') && shell_quote(b, one)
                                : buf_adds(b, one) && buf_addc(b, 0));
        free(one);
        if (!ok) return -1;
        n++;
        if (!t->multi || p[len] != CLI_VALUE_SEP) return n;
    }
}

/* The sh -c script of --shell: the COMMAND words joined by spaces, inputs quoted. */
static bool build_script(struct buf *b, const struct cmd_template *t, const struct job_vars *v)
{
    for (int i = 0; i < t->ntok; i++) {
        if (i && !buf_addc(b, ' ')) return false;
        if (!add_replaced(b, t->tok[i], t, v, true)) return false;
    }
    if (t->append_input && add_input_args(b, t, v->input, true) < 0) return false;
    return true;
}

char **cmd_build_argv(const struct cmd_template *t, const struct job_vars *v)
{
    struct buf s = {0};
    int n = 0;
    bool ok = true;
    if (t->input_is_script || t->shell) {
        ok = buf_adds(&s, "/bin/sh") && buf_addc(&s, 0) && buf_adds(&s, "-c") && buf_addc(&s, 0);
        if (ok) ok = t->input_is_script ? add_joined(&s, v->input) : build_script(&s, t, v);
        ok = ok && buf_addc(&s, 0);
        n = 3;
    } else {
        for (int i = 0; i < t->ntok && ok; i++, n++)
            ok = add_replaced(&s, t->tok[i], t, v, false) && buf_addc(&s, 0);
        if (ok && t->append_input) {
            int k = add_input_args(&s, t, v->input, false);
            ok = k > 0;
            n += k;
        }
    }
    char **argv = NULL;
    if (ok) argv = malloc((size_t)(n + 1) * sizeof *argv + s.len);
    if (argv) {
        char *area = (char *)(argv + n + 1);
        memcpy(area, s.p, s.len);
        for (int i = 0; i < n; i++) {
            argv[i] = area;
            area += strlen(area) + 1;
        }
        argv[n] = NULL;
    }
    buf_free(&s);
    return argv;
}

char *cmd_build_display(const struct cmd_template *t, const struct job_vars *v)
{
    struct buf s = {0};
    bool ok;
    if (t->input_is_script) {
        ok = add_joined(&s, v->input);
    } else if (t->shell) {
        ok = build_script(&s, t, v);
    } else {
        ok = true;
        for (int i = 0; i < t->ntok && ok; i++) {
            struct buf w = {0};
            ok = (i == 0 || buf_addc(&s, ' ')) && add_replaced(&w, t->tok[i], t, v, false) &&
                 buf_addc(&w, 0) && shell_quote(&s, w.p);
            buf_free(&w);
        }
        if (ok && t->append_input) ok = add_input_args(&s, t, v->input, true) > 0;
    }
    if (ok) ok = buf_addc(&s, 0);
    if (!ok) {
        buf_free(&s);
        return NULL;
    }
    return s.p;
}
