/* Turning COMMAND and one input into what is executed: replacement strings ({} and GNU
 * parallel's {.} {/} {//} {/.} {#} {%}), the shell script for --shell, and quoting. */
#include "cli.h"

#include <stdlib.h>
#include <string.h>

/* The replacement strings, longest first so that "{/.}" is not read as "{/}". */
enum repl { R_NONE, R_INPUT, R_NOEXT, R_BASE, R_DIR, R_BASE_NOEXT, R_SEQ, R_SLOT };
static const struct {
    const char *s;
    enum repl r;
} repls[] = {
    {"{//}", R_DIR}, {"{/.}", R_BASE_NOEXT}, {"{}", R_INPUT}, {"{.}", R_NOEXT},
    {"{/}", R_BASE}, {"{#}", R_SEQ},         {"{%}", R_SLOT},
};

static enum repl match_repl(const char *p, size_t *len)
{
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
    for (int i = 0; i < t->ntok; i++) {
        for (const char *p = strchr(t->tok[i], '{'); p; p = strchr(p + 1, '{')) {
            size_t n;
            if (match_repl(p, &n) != R_NONE) t->append_input = false;
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

/* The value of one replacement string, as a (pointer, length) slice or a number. */
static bool add_value(struct buf *b, enum repl r, const struct job_vars *v, bool quote)
{
    const char *in = v->input;
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
    case R_NONE: break;
    }
    ok = ok && buf_addc(&tmp, 0);
    if (ok) ok = quote ? shell_quote(b, tmp.p) : buf_adds(b, tmp.p);
    buf_free(&tmp);
    return ok;
}

static bool add_replaced(struct buf *b, const char *tok, const struct job_vars *v, bool quote)
{
    const char *p = tok;
    while (*p) {
        const char *q = strchr(p, '{');
        if (!q) return buf_adds(b, p);
        size_t n;
        enum repl r = match_repl(q, &n);
        if (!buf_add(b, p, (size_t)(q - p))) return false;
        if (r == R_NONE) {
            if (!buf_addc(b, '{')) return false;
            p = q + 1;
        } else {
            if (!add_value(b, r, v, quote)) return false;
            p = q + n;
        }
    }
    return true;
}

/* The sh -c script of --shell: the COMMAND words joined by spaces, inputs quoted. */
static bool build_script(struct buf *b, const struct cmd_template *t, const struct job_vars *v)
{
    for (int i = 0; i < t->ntok; i++) {
        if (i && !buf_addc(b, ' ')) return false;
        if (!add_replaced(b, t->tok[i], v, true)) return false;
    }
    if (t->append_input && (!buf_addc(b, ' ') || !shell_quote(b, v->input))) return false;
    return true;
}

char **cmd_build_argv(const struct cmd_template *t, const struct job_vars *v)
{
    struct buf s = {0};
    int n = 0;
    bool ok = true;
    if (t->input_is_script || t->shell) {
        ok = buf_adds(&s, "/bin/sh") && buf_addc(&s, 0) && buf_adds(&s, "-c") && buf_addc(&s, 0);
        if (ok) ok = t->input_is_script ? buf_adds(&s, v->input) : build_script(&s, t, v);
        ok = ok && buf_addc(&s, 0);
        n = 3;
    } else {
        for (int i = 0; i < t->ntok && ok; i++, n++)
            ok = add_replaced(&s, t->tok[i], v, false) && buf_addc(&s, 0);
        if (ok && t->append_input) {
            ok = buf_adds(&s, v->input) && buf_addc(&s, 0);
            n++;
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
        ok = buf_adds(&s, v->input);
    } else if (t->shell) {
        ok = build_script(&s, t, v);
    } else {
        ok = true;
        for (int i = 0; i < t->ntok && ok; i++) {
            struct buf w = {0};
            ok = (i == 0 || buf_addc(&s, ' ')) && add_replaced(&w, t->tok[i], v, false) &&
                 buf_addc(&w, 0) && shell_quote(&s, w.p);
            buf_free(&w);
        }
        if (ok && t->append_input) ok = buf_addc(&s, ' ') && shell_quote(&s, v->input);
    }
    if (ok) ok = buf_addc(&s, 0);
    if (!ok) {
        buf_free(&s);
        return NULL;
    }
    return s.p;
}
