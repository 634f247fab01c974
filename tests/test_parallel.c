/* The rank layout (trainer/parallel.c). Alone (test_parallel): every rule of par_validate and its
 * one-line error, par_range, par_init in a world of one, and the rank -> coordinates -> groups
 * mapping of layouts of up to 64 ranks, simulated in this process: each rank's par_init runs on a
 * stand-in world comm whose split records the colour and key it is given, and the groups those
 * make are checked against Megatron-Core's order written out here independently (rank = tp_r +
 * tp * (cp_r + cp * (dp_r + dp * pp_r)); experts tp, ep, expert-dp within a stage). The real
 * par_init takes the layouts the commands run (par_validate refuses tp and cp > 1 today); the other
 * layouts go through a second copy of trainer/parallel.c compiled below with its functions
 * renamed and only the "not supported yet" refusal let through, so its layout code is the real one.
 * Under mpiexec -n 4 (test_parallel_mpi4): par_init over MPI with dp 4, and a size that does not
 * match the world failing alike on every rank (no rank left waiting). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trainer/parallel.h"
#include "mpi_test.h"

/* ------------------- trainer/parallel.c again, renamed, refusing no layout it can lay out */

static int lay_errf(mill_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int lay_validate(const par_sizes *s, const dsv4_config *cfg, int world, long batch_rows, mill_err *e);
int lay_init(par_state *p, comm *world, const par_sizes *s, mill_err *e);
void lay_free(par_state *p);
par_sizes lay_sizes_one(void);
const char *lay_sizes_str(const par_sizes *s, char *buf, size_t n);
void lay_range(long n, int r, int k, long *lo, long *hi);
void lay_stage_layers(const par_sizes *s, int n_layers, int r, int *l0, int *l1);
int lay_vpp(const par_sizes *s);
int lay_wire_parse(const char *v, int *wire);
const char *lay_wire_name(int wire);
int lay_switch_parse(const char *v, int *on);
#define par_switch_parse lay_switch_parse
#define par_wire_parse lay_wire_parse
#define par_wire_name lay_wire_name
int lay_validate_micro(const par_sizes *s, long n_micro, mill_err *e);
int lay_engine(int tp, int ep, par_sizes *s, mill_err *e);
#define par_engine lay_engine

#define par_vpp lay_vpp
#define par_validate_micro lay_validate_micro
#define par_stage_layers lay_stage_layers
#define par_sizes_one lay_sizes_one
#define par_sizes_str lay_sizes_str
#define par_validate lay_validate
#define par_range lay_range
#define par_init lay_init
#define par_free lay_free
#define mill_errf lay_errf
#include "trainer/parallel.c"
#undef par_vpp
#undef par_engine
#undef par_wire_parse
#undef par_switch_parse
#undef par_wire_name
#undef par_validate_micro
#undef par_stage_layers
#undef par_sizes_one
#undef par_sizes_str
#undef par_validate
#undef par_range
#undef par_init
#undef par_free
#undef mill_errf

/* mill_errf for the copy: "not supported yet" (the last rule, so every other one has passed) is
 * no error there. */
static int lay_errf(mill_err *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return strstr(e->msg, "not supported yet") ? 0 : -1;
}

static par_sizes sizes(int tp, int pp, int ep, int cp, int dp) {
    return (par_sizes){.tp = tp, .pp = pp, .ep = ep, .cp = cp, .dp = dp};
}

/* par_validate fails with a message holding want (one line), or passes (want NULL). */
static void expect_validate(par_sizes s, const dsv4_config *cfg, int world, long rows, const char *want) {
    mill_err e = {{0}};
    char b[96];
    int rc = par_validate(&s, cfg, world, rows, &e);
    if (!want) {
        if (rc) fail_msg("%s (world %d, rows %ld): unexpected error: %s", par_sizes_str(&s, b, sizeof b), world, rows, e.msg);
        return;
    }
    if (rc != -1 || !strstr(e.msg, want) || strchr(e.msg, '\n'))
        fail_msg("%s (world %d, rows %ld): rc %d, message \"%s\", want one line with \"%s\"",
                 par_sizes_str(&s, b, sizeof b), world, rows, rc, e.msg, want);
}

/* --------------------------------------------------------------- par_validate */

static void test_validate(void **st) {
    (void)st;
    dsv4_config c;
    memset(&c, 0, sizeof c);
    c.num_attention_heads = 8;
    c.o_groups = 4;
    c.index_n_heads = 8;
    c.moe_intermediate_size = 4;
    c.n_shared_experts = 1;
    c.n_routed_experts = 6;
    c.num_hidden_layers = 2;

    /* passes */
    expect_validate(par_sizes_one(), &c, 1, 4, NULL);
    expect_validate(par_sizes_one(), NULL, 0, 0, NULL);
    expect_validate(sizes(1, 1, 1, 1, 4), &c, 4, 8, NULL);
    expect_validate(sizes(1, 1, 1, 1, 4), &c, 0, 0, NULL); /* world 0, rows 0: not checked */
    expect_validate(sizes(1, 1, 1, 1, 3), &c, 3, 0, NULL);

    /* every size at least 1 (and at most 2^20) */
    const char *nm[5] = {"tp", "pp", "ep", "cp", "dp"};
    for (int i = 0; i < 5; i++) {
        int v[5] = {1, 1, 1, 1, 1};
        for (int bad = -1; bad <= 0; bad++) {
            v[i] = bad;
            char want[64];
            snprintf(want, sizeof want, "parallel: %s must be a positive size, got %d", nm[i], bad);
            expect_validate(sizes(v[0], v[1], v[2], v[3], v[4]), &c, 0, 0, want);
        }
        v[i] = (1 << 20) + 1;
        expect_validate(sizes(v[0], v[1], v[2], v[3], v[4]), NULL, 0, 0, "must be a positive size");
    }

    /* the world */
    expect_validate(sizes(1, 1, 1, 1, 2), &c, 3, 0, "tp x pp x cp x dp = 1 x 1 x 1 x 2 = 2 ranks, but the job has 3");
    expect_validate(sizes(2, 3, 1, 1, 2), NULL, 4, 0, "= 12 ranks, but the job has 4");
    /* the largest sizes: their product (2^80) fits no integer */
    expect_validate(sizes(1 << 20, 1 << 20, 1, 1 << 20, 1 << 20), NULL, 1 << 30, 0,
                    "= 1208925819614629174706176 ranks, but the job has 1073741824");

    /* ep divides dp x cp */
    expect_validate(sizes(1, 1, 3, 1, 2), &c, 0, 0, "parallel: ep 3 must divide dp x cp = 2");
    expect_validate(sizes(1, 1, 4, 2, 3), NULL, 6, 0, "parallel: ep 4 must divide dp x cp = 6");
    expect_validate(sizes(1, 1, 3, 1 << 20, 1 << 20), NULL, 0, 0, "ep 3 must divide dp x cp = 1099511627776");
    {   /* the engine's layouts: tp 2 with ep 4 is 2 attention groups of 2, ep 3 with tp 1 is 3 groups */
        par_sizes f;
        assert_int_equal(par_engine(2, 4, &f, &(mill_err){0}), 0);
        assert_true(f.tp == 2 && f.dp == 2 && f.ep == 4 && f.fold && f.pp == 1 && f.cp == 1);
        assert_int_equal(par_engine(1, 3, &f, &(mill_err){0}), 0);
        assert_true(f.tp == 1 && f.dp == 3 && f.ep == 3);
        mill_err me = {{0}};
        assert_int_equal(par_engine(2, 3, &f, &me), -1);
        assert_non_null(strstr(me.msg, "tp 2 and ep 3 must both divide its 3 ranks"));
    }
    {   /* folded, ep may span tp: 2 x 3 ranks take ep 6 (c's 6 experts) and ep 3, not ep 4 */
        par_sizes f = sizes(2, 1, 6, 1, 3);
        f.fold = 1;
        expect_validate(f, &c, 6, 0, NULL);
        f.ep = 3;
        expect_validate(f, &c, 6, 0, NULL);
        f.ep = 4;
        expect_validate(f, NULL, 6, 0, "parallel: ep 4 must divide tp x dp x cp = 6");
    }

    /* the model's rules (before the sizes not supported yet, so each shows) */
    expect_validate(sizes(3, 1, 1, 1, 1), &c, 0, 0, "parallel: tp 3 must divide num_attention_heads 8");
    dsv4_config c2 = c;
    c2.o_groups = 2;
    expect_validate(sizes(4, 1, 1, 1, 1), &c2, 0, 0, "parallel: tp 4 must divide o_groups 2");
    c2 = c;
    c2.moe_intermediate_size = 6;
    expect_validate(sizes(4, 1, 1, 1, 1), &c2, 0, 0, "parallel: tp 4 must divide the shared experts' hidden units 6");
    expect_validate(sizes(1, 1, 4, 1, 4), &c, 0, 0, "parallel: ep 4 must divide n_routed_experts 6");
    expect_validate(sizes(1, 3, 1, 1, 1), &c, 0, 0, "parallel: pp 3 stages need at least as many layers; the model has 2");
    /* interleaved stages: vpp chunks per pipeline rank, pp > 1, a layer per virtual stage */
    par_sizes v = sizes(1, 1, 1, 1, 1);
    v.vpp = 2;
    expect_validate(v, &c, 0, 0, "parallel: vpp 2 interleaves pipeline stages; it needs pp > 1 (pp is 1)");
    v.pp = 2;
    expect_validate(v, &c, 0, 0, "parallel: pp 2 x vpp 2 = 4 stages need at least as many layers; the model has 2");
    v.vpp = 17;
    expect_validate(v, NULL, 0, 0, "parallel: vpp must be 1 to 16 model chunks per pipeline rank, got 17");
    v.vpp = 2;
    c2 = c;
    c2.num_hidden_layers = 5;
    v.pp_layers[0] = 2, v.pp_layers[1] = 3;
    expect_validate(v, &c2, 0, 0, "parallel: pp_layers gives 2 stage(s) of 5 layers in all; pp x vpp is 4 and the model has 5 layers");
    /* ... which a NULL config skips */
    expect_validate(v, NULL, 0, 0, NULL);

    /* the batch's rows over dp */
    expect_validate(sizes(1, 1, 1, 1, 4), &c, 4, 6, "parallel: the batch's 6 rows must divide evenly over dp 4");
    expect_validate(sizes(1, 1, 1, 1, 4), NULL, 0, 3, "the batch's 3 rows must divide evenly over dp 4");

    /* every kind of parallelism runs */
    expect_validate(sizes(1, 2, 1, 1, 1), &c, 2, 0, NULL); /* stages and experts over ranks */
    expect_validate(sizes(1, 1, 2, 1, 2), &c, 2, 0, NULL);
    expect_validate(sizes(2, 1, 1, 1, 1), &c, 2, 0, NULL); /* heads over ranks */
    expect_validate(sizes(1, 1, 1, 2, 1), &c, 2, 0, NULL); /* positions over ranks */
    expect_validate(sizes(2, 2, 2, 2, 2), &c, 16, 8, NULL);

    /* the real tiny model with the sizes that run */
    dsv4_config tiny;
    mill_err e = {{0}};
    if (config_load(MILL_SOURCE_DIR "/configs/models/dsv4-tiny.json", &tiny, &e)) fail_msg("%s", e.msg);
    expect_validate(par_sizes_one(), &tiny, 1, 4, NULL);
    expect_validate(sizes(1, 1, 1, 1, 2), &tiny, 2, 4, NULL);

    char b[96];
    par_sizes s = sizes(1, 2, 3, 4, 5);
    assert_string_equal(par_sizes_str(&s, b, sizeof b), "tp 1, pp 2, ep 3, cp 4, dp 5");
    s = par_sizes_one();
    assert_true(s.tp == 1 && s.pp == 1 && s.ep == 1 && s.cp == 1 && s.dp == 1);
}

/* ------------------------------------------------------------------ par_range */

static void test_range(void **st) {
    (void)st;
    const long ns[] = {0, 1, 2, 3, 5, 7, 10, 16, 100, 1001, 123457};
    const int ks[] = {1, 2, 3, 4, 7, 16, 33};
    for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++)
        for (size_t b = 0; b < sizeof ks / sizeof ks[0]; b++) {
            long n = ns[a], prev_hi = 0, sum = 0, q = n / ks[b], rem = n % ks[b];
            int k = ks[b];
            for (int r = 0; r < k; r++) {
                long lo = -1, hi = -1;
                par_range(n, r, k, &lo, &hi);
                if (lo != prev_hi) fail_msg("par_range(%ld, %d, %d): starts at %ld, not at %ld", n, r, k, lo, prev_hi);
                long want = q + (r < rem); /* the remainder on the first ranks */
                if (hi - lo != want) fail_msg("par_range(%ld, %d, %d): %ld items, want %ld", n, r, k, hi - lo, want);
                prev_hi = hi;
                sum += hi - lo;
            }
            if (sum != n || prev_hi != n) fail_msg("par_range(%ld, *, %d): %ld items in all, ending at %ld", n, k, sum, prev_hi);
        }
    long lo, hi;
    par_range(3, 4, 7, &lo, &hi); /* n < k: the last ranks get none */
    assert_true(lo == 3 && hi == 3);
    par_range(10, 1, 4, &lo, &hi); /* 3 3 2 2 */
    assert_true(lo == 3 && hi == 6);
    par_range(10, 3, 4, &lo, &hi);
    assert_true(lo == 8 && hi == 10);
}

/* ------------------------------------------------------------------ par_init */

static void test_init_one(void **st) {
    (void)st;
    if (N != 1) skip();
    par_state p;
    mill_err e = {{0}};
    par_sizes s = par_sizes_one();
    assert_int_equal(par_init(&p, W, &s, &e), 0);
    assert_true(p.world == 1 && p.rank == 0 && p.world_c == W);
    assert_true(!p.tp_rank && !p.cp_rank && !p.dp_rank && !p.pp_rank && !p.ep_rank && !p.edp_rank);
    comm *g[] = {p.tp, p.cp, p.dp, p.pp, p.ep, p.edp, p.dpcp, p.mp};
    const char *names[] = {"tp", "cp", "dp", "pp", "ep", "edp", "dpcp", "mp"};
    for (int i = 0; i < 8; i++) {
        assert_non_null(g[i]);
        assert_int_equal(g[i]->size, 1);
        assert_int_equal(g[i]->rank, 0);
        assert_string_equal(g[i]->name, names[i]);
    }
    float x = 2;
    assert_int_equal(comm_all_reduce(p.dp, &x, 1, DTYPE_F32, &e), 0);
    assert_true(x == 2);
    par_free(&p);
    assert_null(p.dp);
    s = sizes(1, 1, 1, 1, 2);
    assert_int_equal(par_init(&p, W, &s, &e), -1);
    assert_non_null(strstr(e.msg, "= 2 ranks, but the job has 1"));
    assert_null(p.dp);
}

/* The stand-in world: its split records (colour, key) per rank and group and makes an empty comm. */
#define MAXW 64
#define NG 8
static const char *const GROUP[NG] = {"tp", "cp", "dp", "pp", "dpcp", "mp", "ep", "edp"};
static int rec_color[MAXW][NG], rec_key[MAXW][NG], rec_n[MAXW][NG];

static int group_of(const char *name) {
    for (int g = 0; g < NG; g++)
        if (!strcmp(name, GROUP[g])) return g;
    return -1;
}

static int fake_split(comm *c, int color, int key, const char *name, comm **out, mill_err *e) {
    int g = group_of(name);
    if (g < 0 || c->rank < 0 || c->rank >= MAXW) return mill_errf(e, "fake split: group %s, rank %d", name, c->rank);
    rec_color[c->rank][g] = color;
    rec_key[c->rank][g] = key;
    rec_n[c->rank][g]++;
    comm *o = calloc(1, sizeof *o);
    if (!o) return mill_errf(e, "out of memory");
    o->ops = c->ops;
    o->rank = o->size = -1; /* known once every rank has split */
    o->host = o;
    snprintf(o->name, sizeof o->name, "%s", name);
    *out = o;
    return 0;
}
static void fake_abort(comm *c) { (void)c; }
static void fake_free(comm *c) { (void)c; }
static const comm_ops fake_ops = {.name = "fake", .split = fake_split, .abort = fake_abort, .free = fake_free};

typedef int (*init_fn)(par_state *, comm *, const par_sizes *, mill_err *);
typedef void (*free_fn)(par_state *);

/* Every rank of layout s through init on the stand-in world, against Megatron-Core's order. */
static void check_layout(par_sizes s, init_fn init, free_fn pfree) {
    int tp = s.tp, pp = s.pp, ep = s.ep, cp = s.cp, dp = s.dp, w = tp * pp * cp * dp;
    int edp = (s.fold ? tp : 1) * dp * cp / ep, et = s.fold ? 1 : tp; /* folded: the experts over tp too */
    char b[96];
    par_sizes_str(&s, b, sizeof b);
    assert_true(w <= MAXW && ((s.fold ? tp : 1) * dp * cp) % ep == 0);
    /* the coordinates each rank should get, by walking them in order */
    int crd[MAXW][6], seen[MAXW] = {0}; /* tp cp dp pp ep edp */
    for (int q = 0; q < pp; q++)
        for (int d = 0; d < dp; d++)
            for (int c = 0; c < cp; c++)
                for (int t = 0; t < tp; t++) {
                    int r = t + tp * (c + cp * (d + dp * q));
                    crd[r][0] = t, crd[r][1] = c, crd[r][2] = d, crd[r][3] = q;
                    seen[r]++;
                }
    for (int q = 0; q < pp; q++)
        for (int x = 0; x < edp; x++)
            for (int y = 0; y < ep; y++)
                for (int t = 0; t < et; t++) {
                    int r = q * tp * cp * dp + t + et * (y + ep * x);
                    crd[r][4] = y, crd[r][5] = x;
                    seen[r]++;
                }
    for (int r = 0; r < w; r++) assert_int_equal(seen[r], 2);
    memset(rec_n, 0, sizeof rec_n);
    for (int r = 0; r < w; r++) {
        comm world = {.ops = &fake_ops, .rank = r, .size = w, .device = DEVICE_CPU};
        world.host = &world;
        snprintf(world.name, sizeof world.name, "world");
        par_state p;
        mill_err e = {{0}};
        if (init(&p, &world, &s, &e)) fail_msg("%s: rank %d: %s", b, r, e.msg);
        int got[6] = {p.tp_rank, p.cp_rank, p.dp_rank, p.pp_rank, p.ep_rank, p.edp_rank};
        for (int i = 0; i < 6; i++)
            if (got[i] != crd[r][i])
                fail_msg("%s: rank %d: coordinate %d (tp cp dp pp ep edp) is %d, want %d", b, r, i, got[i], crd[r][i]);
        assert_true(p.world == w && p.rank == r && p.world_c == &world);
        comm *g[NG] = {p.tp, p.cp, p.dp, p.pp, p.dpcp, p.mp, p.ep, p.edp};
        for (int i = 0; i < NG; i++) {
            if (!g[i] || strcmp(g[i]->name, GROUP[i]) || rec_n[r][i] != 1)
                fail_msg("%s: rank %d: group %s not made once by a split", b, r, GROUP[i]);
        }
        pfree(&p);
    }
    /* each group: who shares it, and each member's place in it (the key's order) */
    const int want_size[NG] = {tp, cp, dp, pp, dp * cp, tp * pp, ep, edp};
    for (int g = 0; g < NG; g++)
        for (int a = 0; a < w; a++) {
            const int *x = crd[a];
            int size = 0, place = 0, want_place;
            switch (g) {
            case 0: want_place = x[0]; break;
            case 1: want_place = x[1]; break;
            case 2: want_place = x[2]; break;
            case 3: want_place = x[3]; break;
            case 4: want_place = x[1] + cp * x[2]; break;
            case 5: want_place = x[0] + tp * x[3]; break;
            case 6: want_place = x[4]; break;
            default: want_place = x[5]; break;
            }
            for (int bb = 0; bb < w; bb++) {
                const int *y = crd[bb];
                int same;
                switch (g) {
                case 0: same = y[1] == x[1] && y[2] == x[2] && y[3] == x[3]; break; /* tp: same cp, dp, pp */
                case 1: same = y[0] == x[0] && y[2] == x[2] && y[3] == x[3]; break; /* cp: same tp, dp, pp */
                case 2: same = y[0] == x[0] && y[1] == x[1] && y[3] == x[3]; break; /* dp: same tp, cp, pp */
                case 3: same = y[0] == x[0] && y[1] == x[1] && y[2] == x[2]; break; /* pp: same tp, cp, dp */
                case 4: same = y[0] == x[0] && y[3] == x[3]; break;                 /* dpcp: same tp, pp */
                case 5: same = y[1] == x[1] && y[2] == x[2]; break;                 /* mp: same cp, dp */
                /* ep: same tp (unless folded), pp, edp; edp: same tp (unless folded), pp, ep */
                case 6: same = (s.fold || y[0] == x[0]) && y[3] == x[3] && y[5] == x[5]; break;
                default: same = (s.fold || y[0] == x[0]) && y[3] == x[3] && y[4] == x[4]; break;
                }
                int same_color = rec_color[bb][g] == rec_color[a][g];
                if (same != same_color)
                    fail_msg("%s: group %s: ranks %d and %d %s, but their split colours say otherwise", b, GROUP[g], a,
                             bb, same ? "belong together" : "do not belong together");
                if (!same) continue;
                size++;
                if (bb != a && rec_key[bb][g] == rec_key[a][g])
                    fail_msg("%s: group %s: ranks %d and %d have the same key %d", b, GROUP[g], a, bb, rec_key[a][g]);
                place += rec_key[bb][g] < rec_key[a][g];
            }
            if (size != want_size[g]) fail_msg("%s: group %s of rank %d has %d ranks, want %d", b, GROUP[g], a, size, want_size[g]);
            if (place != want_place)
                fail_msg("%s: group %s: rank %d is its rank %d, want %d", b, GROUP[g], a, place, want_place);
            if (rec_color[a][g] < 0) fail_msg("%s: group %s: negative colour %d", b, GROUP[g], rec_color[a][g]);
        }
}

/* par_init itself: the layouts it takes today (dp only) at several world sizes. */
static void test_layout_dp(void **st) {
    (void)st;
    for (int dp = 2; dp <= 9; dp++) check_layout(sizes(1, 1, 1, 1, dp), par_init, par_free);
}

/* The same layout code with tp, pp, cp and ep > 1 (the renamed copy above). */
static void test_layout_all(void **st) {
    (void)st;
    const par_sizes ls[] = {
        sizes(2, 1, 1, 1, 1), sizes(1, 2, 1, 1, 1), sizes(1, 1, 1, 2, 1), sizes(1, 1, 2, 1, 2), sizes(2, 1, 1, 1, 3),
        sizes(1, 3, 2, 1, 2), sizes(2, 2, 2, 2, 2), sizes(2, 1, 3, 3, 1), sizes(1, 1, 4, 1, 4), sizes(4, 2, 4, 2, 2),
        sizes(2, 2, 1, 2, 3), sizes(3, 1, 6, 2, 3), sizes(2, 2, 2, 1, 4), sizes(1, 2, 3, 1, 3),
    };
    for (size_t i = 0; i < sizeof ls / sizeof ls[0]; i++) check_layout(ls[i], lay_init, lay_free);
    /* folded: the experts over tp x cp x dp (the rollout engine's tp x dp with ep up to their product) */
    const par_sizes fs[] = {sizes(2, 1, 2, 1, 1), sizes(2, 1, 4, 1, 2), sizes(4, 1, 2, 1, 1), sizes(3, 1, 3, 1, 1),
                            sizes(2, 2, 6, 1, 3), sizes(1, 1, 3, 1, 3), sizes(2, 1, 1, 1, 2), sizes(2, 2, 4, 2, 1)};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) {
        par_sizes f = fs[i];
        f.fold = 1;
        check_layout(f, lay_init, lay_free);
    }
    /* the copy still refuses what it should */
    par_state p;
    mill_err e = {{0}};
    par_sizes s = sizes(2, 1, 1, 1, 2);
    comm world = {.ops = &fake_ops, .rank = 0, .size = 3, .device = DEVICE_CPU};
    assert_int_equal(lay_init(&p, &world, &s, &e), -1);
    assert_non_null(strstr(e.msg, "= 4 ranks, but the job has 3"));
}

/* ---------------------------------------------------------- under mpiexec -n 4 */

static void test_init_mpi(void **st) {
    (void)st;
    par_state p;
    mill_err e = {{0}};
    par_sizes s = sizes(1, 1, 1, 1, N);
    int rc = par_init(&p, W, &s, &e);
    CHECK(rc == 0, "par_init with dp %d: %s", N, e.msg);
    if (rc == 0) {
        CHECK(p.world == N && p.rank == R && p.world_c == W, "world %d rank %d", p.world, p.rank);
        CHECK(p.dp_rank == R && p.edp_rank == R, "dp_rank %d, edp_rank %d, want %d", p.dp_rank, p.edp_rank, R);
        CHECK(!p.tp_rank && !p.cp_rank && !p.pp_rank && !p.ep_rank, "tp %d cp %d pp %d ep %d", p.tp_rank, p.cp_rank,
              p.pp_rank, p.ep_rank);
        comm *g[] = {p.tp, p.cp, p.dp, p.pp, p.ep, p.edp, p.dpcp, p.mp};
        const char *names[] = {"tp", "cp", "dp", "pp", "ep", "edp", "dpcp", "mp"};
        const int want[] = {1, 1, N, 1, 1, N, N, 1};
        for (int i = 0; i < 8; i++) {
            CHECK(g[i] && g[i]->size == want[i] && g[i]->rank == (want[i] == 1 ? 0 : R) && !strcmp(g[i]->name, names[i]),
                  "group %s: size %d rank %d, want size %d", names[i], g[i] ? g[i]->size : -1, g[i] ? g[i]->rank : -1,
                  want[i]);
        }
        /* the groups work: a sum over dp, over dpcp, and none over tp */
        int32_t v[3] = {R + 1, R + 1, R + 1};
        rc = comm_all_reduce(p.dp, v, 1, DTYPE_I32, &e) || comm_all_reduce(p.dpcp, v + 1, 1, DTYPE_I32, &e) ||
             comm_all_reduce(p.tp, v + 2, 1, DTYPE_I32, &e);
        CHECK(rc == 0 && v[0] == N * (N + 1) / 2 && v[1] == v[0] && v[2] == R + 1, "sums %d %d %d (%s)", v[0], v[1],
              v[2], e.msg);
        par_free(&p);
    }
    mpi_test_agree("par_init dp N");
}

static void test_init_mpi_mismatch(void **st) {
    (void)st;
    par_state p;
    mill_err e = {{0}};
    int dp = N == 2 ? 3 : 2;
    par_sizes s = sizes(1, 1, 1, 1, dp);
    char want[96];
    snprintf(want, sizeof want, "= %d ranks, but the job has %d", dp, N);
    int rc = par_init(&p, W, &s, &e);
    CHECK(rc == -1 && strstr(e.msg, want) && !p.dp, "par_init with dp %d on %d ranks: rc %d, \"%s\"", dp, N, rc, e.msg);
    /* the world matches, the layout is refused */
    s = sizes(1, 1, 1, 1, N);
    s.vpp = 2;
    rc = par_init(&p, W, &s, &e);
    CHECK(rc == -1 && strstr(e.msg, "it needs pp > 1"), "par_init with vpp 2, pp 1: rc %d, \"%s\"", rc, e.msg);
    mill_err e2 = {{0}};
    CHECK(comm_barrier(W, &e2) == 0, "barrier after the refusals: %s", e2.msg); /* every rank got here */
    mpi_test_agree("par_init refused");
}

int main(void) {
    setenv("MILL_COMM_TIMEOUT_S", "60", 0);
    mill_err e = {{0}};
    if (comm_world_init(&W, &e)) {
        fprintf(stderr, "test_parallel: %s\n", e.msg);
        return 1;
    }
    R = W->rank;
    N = W->size;
    if (mpi_test_quiet(R)) return 1;
    const struct CMUnitTest one[] = {
        cmocka_unit_test(test_validate), cmocka_unit_test(test_range),      cmocka_unit_test(test_init_one),
        cmocka_unit_test(test_layout_dp), cmocka_unit_test(test_layout_all),
    };
    const struct CMUnitTest ranks[] = {
        cmocka_unit_test(test_init_mpi),
        cmocka_unit_test(test_init_mpi_mismatch),
    };
    int failed = N > 1 ? cmocka_run_group_tests_name("par_init over MPI ranks", ranks, NULL, NULL)
                       : cmocka_run_group_tests_name("the rank layout", one, NULL, NULL);
    return mpi_test_verdict(W, failed); /* the same verdict on every rank */
}
