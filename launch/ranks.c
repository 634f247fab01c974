#include "ranks.h"

#include <errno.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const opts[6] = {"--tp", "--pp", "--ep", "--cp", "--dp", "--vpp"};

int ranks_is_option(const char *arg) {
    for (int i = 0; i < 6; i++)
        if (!strcmp(arg, opts[i])) return 1;
    return !strcmp(arg, "--pp-layers") || !strcmp(arg, "--pp-dtype") || !strcmp(arg, "--sp");
}


/* --pp-layers 2,1,1: each stage's layer count, in order. */
static int parse_split(const char *v, par_sizes *s, mill_err *e) {
    int n = 0;
    for (const char *p = v; *p; n++) {
        char *end;
        long x = strtol(p, &end, 10);
        if (n == PAR_MAX_STAGES || end == p || x < 1 || x > 1 << 20 || (*end && *end != ','))
            return mill_errf(e, "--pp-layers needs 1 to %d positive layer counts, e.g. 2,1,1; got \"%s\"", PAR_MAX_STAGES, v);
        s->pp_layers[n] = (int)x;
        p = *end ? end + 1 : end;
    }
    return 0;
}

int ranks_parse(int argc, char **argv, par_sizes *s, mill_err *e) {
    *s = par_sizes_one();
    int *dst[6] = {&s->tp, &s->pp, &s->ep, &s->cp, &s->dp, &s->vpp}, seen[6] = {0};
    for (int i = 2; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--pp-layers") && parse_split(argv[i + 1], s, e)) return -1;
        if (!strcmp(argv[i], "--pp-dtype") && par_wire_parse(argv[i + 1], &s->pp_wire))
            return mill_errf(e, "--pp-dtype must be auto, fp32 or bf16, got \"%s\"", argv[i + 1]);
        if (!strcmp(argv[i], "--sp") && par_switch_parse(argv[i + 1], &s->sp))
            return mill_errf(e, "--sp (sequence parallelism) must be on or off, got \"%s\"", argv[i + 1]);
    }
    for (int i = 2; i < argc; i++)
        for (int j = 0; j < 6; j++) {
            if (strcmp(argv[i], opts[j])) continue;
            if (seen[j]++) return mill_errf(e, "%s given twice", opts[j]);
            char *end;
            long v = i + 1 < argc ? strtol(argv[i + 1], &end, 10) : 0;
            if (i + 1 >= argc || *end || v < 1 || v > 1 << 20)
                return mill_errf(e, "%s needs a positive integer, got \"%s\"", opts[j], i + 1 < argc ? argv[i + 1] : "");
            *dst[j] = (int)v;
        }
    return 0;
}

int ranks_engine_sizes(int argc, char **argv, par_sizes *s, mill_err *e) {
    TRY(ranks_parse(argc, argv, s, e));
    for (int i = 2; i < argc; i++)
        if (ranks_is_option(argv[i]) && strcmp(argv[i], "--tp") && strcmp(argv[i], "--ep"))
            return mill_errf(e, "%s: an engine is spread over ranks by --tp and --ep only", argv[i]);
    return par_engine(s->tp, s->ep, s, e);
}

static int on_path(const char *name, char *path, size_t n) {
    const char *p = getenv("PATH");
    if (!p) return 0;
    while (*p) {
        const char *c = strchr(p, ':');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        snprintf(path, n, "%.*s/%s", (int)len, p, name);
        if (len && access(path, X_OK) == 0) return 1;
        p += len + (c != NULL);
    }
    return 0;
}

int ranks_mpiexec(char *path, size_t n, mill_err *e) {
    const char *env = getenv("MILL_MPIEXEC");
    if (env && *env) {
        if (strchr(env, '/')) {
            if (access(env, X_OK)) return mill_errf(e, "MILL_MPIEXEC=%s: not an executable: %s", env, strerror(errno));
            snprintf(path, n, "%s", env);
            return 0;
        }
        if (on_path(env, path, n)) return 0;
        return mill_errf(e, "MILL_MPIEXEC=%s: not found on PATH", env);
    }
    /* the launcher of the MPI this mill was built with first: a plain `mpiexec` may be another
     * MPI's (Open MPI's beside MPICH), whose ranks would not find each other */
#ifdef MPICH_VERSION
    static const char *const names[] = {"mpiexec.hydra", "mpiexec.mpich", "mpiexec", NULL};
#else
    static const char *const names[] = {"mpiexec.openmpi", "mpiexec", NULL};
#endif
    for (const char *const *nm = names; *nm; nm++)
        if (on_path(*nm, path, n)) return 0;
    return mill_errf(e, "no %s on PATH to start the ranks (install MPICH: scripts/deps.sh; or set MILL_MPIEXEC)", names[0]);
}

int ranks_start(int argc, char **argv, const par_sizes *s, const dsv4_config *cfg, long batch_rows,
                comm **world, mill_err *e) {
    *world = NULL;
    TRY(par_validate(s, cfg, 0, batch_rows, e));
    int w = s->tp * s->pp * s->cp * s->dp;
    if (w > 1 && !comm_in_launch()) {
        char mpiexec[4096], self[4096], np[16];
        TRY(ranks_mpiexec(mpiexec, sizeof mpiexec, e));
        ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
        if (len <= 0) return mill_errf(e, "cannot find the mill executable (/proc/self/exe): %s", strerror(errno));
        self[len] = 0;
        snprintf(np, sizeof np, "%d", w);
        char **av = calloc((size_t)argc + 5, sizeof *av);
        if (!av) return mill_errf(e, "out of memory");
        int k = 0;
        av[k++] = mpiexec;
        av[k++] = "-n";
        av[k++] = np;
        av[k++] = self;
        for (int i = 1; i < argc; i++) av[k++] = argv[i];
        fflush(stdout);
        fflush(stderr);
        execv(mpiexec, av);
        free(av);
        return mill_errf(e, "cannot start %s: %s", mpiexec, strerror(errno));
    }
    TRY(comm_world_init(world, e));
    if ((*world)->size != w) {
        char b[96];
        mill_errf(e, "this job has %d ranks but the layout (%s) needs %d", (*world)->size,
                  par_sizes_str(s, b, sizeof b), w);
        /* every rank finds the same mismatch: an orderly end, not an abort */
        comm_world_end(*world, 0);
        *world = NULL;
        return -1;
    }
    return 0;
}
