/* Turning COMMAND and one job's input into what is executed: GNU parallel's replacement
 * strings ({} {.} {/} {//} {/.} {#} {%}, {n} and {-n} with the same modifiers, {name} with
 * --header, and the strings -I, --er... put in their place), the shell script of --shell, and
 * quoting.
 *
 * GNU parallel always hands the command line to a shell, so a word in which {} stands for
 * several values (-n 2, -m, several sources) becomes several words there: "x{}y" with 1 and 2
 * is "x1 2y", which the shell splits into x1 and 2y. We run COMMAND directly, so we split the
 * word at the same places (each value stays one word, spaces and all, as parallel's quoting
 * keeps it). With -X, -N and -L the word is repeated once per value instead ("x1y x2y"). */
#include "cli.h"
#include "input.h"

#include <errno.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>

/* Marks where a word is to be split into two argv words. */
#define WORD_BREAK '\x1e'

enum rkind { RK_NONE, RK_ALL, RK_POS, RK_NAME, RK_SEQ, RK_SLOT };
enum rmod { M_NONE, M_NOEXT, M_BASE, M_DIR, M_BASE_NOEXT };

struct rmatch {
    enum rkind k;
    enum rmod m;
    int pos;              /* RK_POS: from 1, or from the end when < 0 */
    const char *name;     /* RK_NAME */
    size_t namelen;
    size_t len;           /* of the replacement string */
};

static const char *const default_repl[7] = {"{}", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}"};

/* A modifier ("", ".", "/", "//", "/.") spelled from p to end. */
static bool parse_mod(const char *p, size_t n, enum rmod *m)
{
    if (n == 0) *m = M_NONE;
    else if (n == 1 && p[0] == '.') *m = M_NOEXT;
    else if (n == 1 && p[0] == '/') *m = M_BASE;
    else if (n == 2 && p[0] == '/' && p[1] == '/') *m = M_DIR;
    else if (n == 2 && p[0] == '/' && p[1] == '.') *m = M_BASE_NOEXT;
    else return false;
    return true;
}

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '-' || c == ' ';
}

/* Matches a replacement string at p. */
static bool match_repl(const struct cmd_template *t, const char *p, struct rmatch *r)
{
    /* The seven fixed strings (or what -I and friends made them), longest first. */
    static const enum rkind kinds[7] = {RK_ALL, RK_ALL, RK_ALL, RK_ALL, RK_ALL, RK_SEQ, RK_SLOT};
    static const enum rmod mods[7] = {M_NONE, M_NOEXT, M_BASE, M_DIR, M_BASE_NOEXT, M_NONE,
                                      M_NONE};
    size_t best = 0;
    for (int i = 0; i < 7; i++) {
        size_t n = strlen(t->repl[i]);
        if (n > best && strncmp(p, t->repl[i], n) == 0) {
            best = n;
            *r = (struct rmatch){.k = kinds[i], .m = mods[i], .len = n};
        }
    }
    if (best) return true;
    if (p[0] != '{') return false;
    const char *q = p + 1;
    bool neg = *q == '-';
    if (neg) q++;
    if (*q >= '0' && *q <= '9') {
        long n = 0;
        while (*q >= '0' && *q <= '9' && n < 100000000) n = n * 10 + (*q++ - '0');
        const char *close = strchr(q, '}');
        if (n == 0 || !close || close - q > 2 || !parse_mod(q, (size_t)(close - q), &r->m))
            return false;
        r->k = RK_POS;
        r->pos = neg ? -(int)n : (int)n;
        r->len = (size_t)(close + 1 - p);
        return true;
    }
    if (!t->names || neg) return false;
    /* {name} and {name/}, {name.}...: a column named by --header. */
    const char *e = p + 1;
    while (is_name_char(*e) || *e == '.' || *e == '/') e++;
    if (*e != '}' || e == p + 1) return false;
    size_t n = (size_t)(e - (p + 1));
    r->k = RK_NAME;
    r->m = M_NONE;
    r->name = p + 1;
    r->namelen = n;
    for (size_t k = 1; k <= 2 && k < n; k++) {
        enum rmod m;
        if (parse_mod(p + 1 + n - k, k, &m) && m != M_NONE) {
            r->m = m;
            r->namelen = n - k;
        }
    }
    r->len = n + 2;
    return true;
}

static bool has_repl(const struct cmd_template *t, const char *tok, bool *all)
{
    bool any = false;
    for (const char *p = tok; *p; p++) {
        struct rmatch r;
        if (match_repl(t, p, &r)) {
            any = true;
            if (r.k == RK_ALL && all) *all = true;
            p += r.len - 1;
        }
    }
    return any;
}

void cmd_template_init(struct cmd_template *t, const struct run_options *o)
{
    memset(t, 0, sizeof *t);
    t->tok = o->cmd;
    t->ntok = o->ncmd;
    t->shell = o->shell;
    t->input_is_script = o->ncmd == 0;
    t->append_input = !t->input_is_script;
    t->multi = o->nsrc > 1 || o->colsep || o->multi != MULTI_NONE;
    t->context = o->multi == MULTI_X || o->multi == MULTI_NN;
    t->no_args = (o->multi == MULTI_N || o->multi == MULTI_NN) && o->max_args == 0;
    t->names = o->header;
    t->tagstring = o->tagstring;
    for (int i = 0; i < 7; i++) t->repl[i] = o->repl[i] ? o->repl[i] : default_repl[i];
    for (int i = 0; i < t->ntok; i++)
        if (has_repl(t, t->tok[i], NULL)) t->append_input = false;
    if (t->no_args) t->append_input = false;
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
        ok = *p == '\'' ? buf_adds(b, "'\"'\"'") : buf_addc(b, *p); /* as GNU parallel */
    return ok && buf_addc(b, '\'');
}

/* One job's values, split out of its input: every record's every value, in order. */
struct vals {
    char *copy;
    const char **v;
    int n;
};

static bool vals_split(const struct cmd_template *t, const char *input, struct vals *vs)
{
    memset(vs, 0, sizeof *vs);
    if (t->no_args) return true;
    vs->copy = strdup(input);
    if (!vs->copy) return false;
    int n = 1;
    if (t->multi)
        for (const char *p = input; *p; p++) n += *p == CLI_VALUE_SEP || *p == CLI_RECORD_SEP;
    vs->v = malloc((size_t)n * sizeof *vs->v);
    if (!vs->v) {
        free(vs->copy);
        return false;
    }
    vs->v[vs->n++] = vs->copy;
    if (t->multi) {
        for (char *p = vs->copy; *p; p++) {
            if (*p == CLI_VALUE_SEP || *p == CLI_RECORD_SEP) {
                *p = 0;
                vs->v[vs->n++] = p + 1;
            }
        }
    }
    return true;
}

static void vals_free(struct vals *vs)
{
    free(vs->copy);
    free(vs->v);
}

/* Appends value s with modifier m, as GNU parallel computes them: {.} drops a final
 * ".ext" (no '/' or '.' in ext), {/} keeps what follows the last '/', {//} is dirname(3). */
static bool add_modified(struct buf *b, const char *s, enum rmod m, bool quote)
{
    struct buf tmp = {0};
    const char *slash = strrchr(s, '/');
    const char *base = slash ? slash + 1 : s;
    const char *dot = strrchr(base, '.');
    bool ok;
    switch (m) {
    case M_NOEXT: ok = buf_add(&tmp, s, dot ? (size_t)(dot - s) : strlen(s)); break;
    case M_BASE: ok = buf_adds(&tmp, base); break;
    case M_BASE_NOEXT: ok = buf_add(&tmp, base, dot ? (size_t)(dot - base) : strlen(base)); break;
    case M_DIR: {
        char *c = strdup(s);
        ok = c && buf_adds(&tmp, dirname(c));
        free(c);
        break;
    }
    default: ok = buf_adds(&tmp, s); break;
    }
    ok = ok && buf_addc(&tmp, 0);
    if (ok) ok = quote ? shell_quote(b, tmp.p) : buf_adds(b, tmp.p);
    buf_free(&tmp);
    return ok;
}

struct ctx {
    const struct cmd_template *t;
    const struct job_vars *v;
    const struct vals *vs;
};

/* Appends tok with its replacement strings replaced. {} stands for value `one` when >= 0,
 * else for all of them separated by `join` (a space in a script, WORD_BREAK in an argv). */
static bool subst(struct buf *b, const char *tok, const struct ctx *c, int one, char join,
                  bool quote)
{
    const struct vals *vs = c->vs;
    for (const char *p = tok; *p;) {
        struct rmatch r;
        if (!match_repl(c->t, p, &r)) {
            if (!buf_addc(b, *p++)) return false;
            continue;
        }
        char num[32];
        const char *val = NULL;
        switch (r.k) {
        case RK_ALL:
            if (one >= 0) {
                if (!add_modified(b, vs->v[one], r.m, quote)) return false;
                break;
            }
            if (vs->n == 0 && quote && !buf_adds(b, "''")) return false;
            for (int k = 0; k < vs->n; k++)
                if ((k && !buf_addc(b, join)) || !add_modified(b, vs->v[k], r.m, quote))
                    return false;
            break;
        case RK_POS: {
            int k = r.pos > 0 ? r.pos - 1 : vs->n + r.pos;
            val = k >= 0 && k < vs->n ? vs->v[k] : "";
            break;
        }
        case RK_NAME: {
            int col = c->t->in ? input_column(c->t->in, r.name, r.namelen) : 0;
            if (!col) { /* not a column: the text stays */
                if (!buf_add(b, p, r.len)) return false;
                break;
            }
            val = col <= vs->n ? vs->v[col - 1] : "";
            break;
        }
        case RK_SEQ:
            snprintf(num, sizeof num, "%lu", c->v->seq);
            if (!buf_adds(b, num)) return false;
            break;
        case RK_SLOT:
            snprintf(num, sizeof num, "%d", c->v->slot);
            if (!buf_adds(b, num)) return false;
            break;
        case RK_NONE: break;
        }
        if (val && !add_modified(b, val, r.m, quote)) return false;
        p += r.len;
    }
    return true;
}

/* One COMMAND word, for a script (quote: values quoted, copies joined by spaces) or an argv
 * (words NUL-terminated, *n counts them). */
static bool add_word(struct buf *b, const char *tok, const struct ctx *c, bool script, int *n)
{
    bool all = false;
    has_repl(c->t, tok, &all);
    if (script) {
        if (all && c->t->context && c->vs->n != 1) {
            for (int k = 0; k < c->vs->n; k++)
                if ((k && !buf_addc(b, ' ')) || !subst(b, tok, c, k, ' ', true)) return false;
            return true;
        }
        return subst(b, tok, c, -1, ' ', true);
    }
    if (all && c->t->context && c->vs->n != 1) {
        for (int k = 0; k < c->vs->n; k++, (*n)++)
            if (!subst(b, tok, c, k, 0, false) || !buf_addc(b, 0)) return false;
        return c->vs->n > 0 || (subst(b, tok, c, -1, 0, false) && buf_addc(b, 0) && ++*n);
    }
    size_t start = b->len;
    if (!subst(b, tok, c, -1, WORD_BREAK, false) || !buf_addc(b, 0)) return false;
    (*n)++;
    if (all && c->vs->n > 1) {
        for (size_t i = start; i < b->len; i++) {
            if (b->p[i] == WORD_BREAK) {
                b->p[i] = 0;
                (*n)++;
            }
        }
    }
    return true;
}

/* The values appended when COMMAND has no replacement string: one argument each. */
static bool add_appended(struct buf *b, const struct ctx *c, bool script, int *n)
{
    for (int k = 0; k < c->vs->n; k++) {
        bool ok = script ? buf_addc(b, ' ') && shell_quote(b, c->vs->v[k])
                         : buf_adds(b, c->vs->v[k]) && buf_addc(b, 0);
        if (!ok) return false;
        (*n)++;
    }
    return true;
}

/* An input's text as a shell command line (no COMMAND): values joined by spaces. */
static bool add_joined(struct buf *b, const char *in)
{
    for (const char *p = in; *p; p++)
        if (!buf_addc(b, *p == CLI_VALUE_SEP || *p == CLI_RECORD_SEP ? ' ' : *p)) return false;
    return true;
}

static bool build_script(struct buf *b, const struct ctx *c)
{
    int n = 0;
    for (int i = 0; i < c->t->ntok; i++) {
        if (i && !buf_addc(b, ' ')) return false;
        if (!add_word(b, c->t->tok[i], c, true, &n)) return false;
    }
    return !c->t->append_input || add_appended(b, c, true, &n);
}

/* The words of the job's argv into s (NUL-terminated each); *n counts them. */
static bool build_words(const struct cmd_template *t, const struct job_vars *v, struct buf *s,
                        int *n)
{
    *n = 0;
    if (t->input_is_script || t->shell) {
        bool ok = buf_adds(s, "/bin/sh") && buf_addc(s, 0) && buf_adds(s, "-c") && buf_addc(s, 0);
        if (ok && t->input_is_script) {
            ok = add_joined(s, v->input);
        } else if (ok) {
            struct vals vs;
            if (!vals_split(t, v->input, &vs)) return false;
            struct ctx c = {.t = t, .v = v, .vs = &vs};
            ok = build_script(s, &c);
            vals_free(&vs);
        }
        *n = 3;
        return ok && buf_addc(s, 0);
    }
    struct vals vs;
    if (!vals_split(t, v->input, &vs)) return false;
    struct ctx c = {.t = t, .v = v, .vs = &vs};
    bool ok = true;
    for (int i = 0; i < t->ntok && ok; i++) ok = add_word(s, t->tok[i], &c, false, n);
    if (ok && t->append_input) ok = add_appended(s, &c, false, n);
    vals_free(&vs);
    return ok;
}

char **cmd_build_argv(const struct cmd_template *t, const struct job_vars *v)
{
    struct buf s = {0};
    int n;
    bool ok = build_words(t, v, &s, &n) && n > 0;
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
        struct vals vs;
        ok = vals_split(t, v->input, &vs);
        if (ok) {
            struct ctx c = {.t = t, .v = v, .vs = &vs};
            ok = build_script(&s, &c);
            vals_free(&vs);
        }
    } else {
        char **argv = cmd_build_argv(t, v);
        ok = argv != NULL;
        for (int i = 0; ok && argv[i]; i++) ok = (i == 0 || buf_addc(&s, ' ')) && shell_quote(&s, argv[i]);
        free(argv);
    }
    if (ok) ok = buf_addc(&s, 0);
    if (!ok) {
        buf_free(&s);
        return NULL;
    }
    return s.p;
}

bool cmd_build_tag(const struct cmd_template *t, const struct job_vars *v, struct buf *b)
{
    if (!t->tagstring) {
        /* --tag: the input, its values separated by spaces (as GNU parallel's {}). */
        for (const char *p = v->input; *p; p++) {
            char c = *p == CLI_VALUE_SEP || *p == CLI_RECORD_SEP ? ' ' : *p;
            if (!buf_addc(b, c)) return false;
        }
        return true;
    }
    struct vals vs;
    if (!vals_split(t, v->input, &vs)) return false;
    struct ctx c = {.t = t, .v = v, .vs = &vs};
    bool ok = subst(b, t->tagstring, &c, -1, ' ', false);
    vals_free(&vs);
    return ok;
}

const char *cmd_shell_hint(const struct cmd_template *t, const char *argv0, int err)
{
    if (t->shell || t->input_is_script || err != -ENOENT || !argv0) return "";
    /* A command name with a space or a shell character in it was meant for a shell. */
    if (strpbrk(argv0, " \t\n|&;<>()$`\\\"'*?[]#~=%{}"))
        return " (COMMAND runs without a shell here; GNU parallel gives it to one: add --shell, "
               "or split the words)";
    return "";
}
