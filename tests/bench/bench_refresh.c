/* Weight-refresh time (a benchmark: it prints, never fails on time): a full model's weights pushed
 * from the trainer to a rollout engine through the code path the GRPO loop uses, against the floor
 * of copying the same bytes once within the device's memory.
 *
 * What runs: the trainer worker (trainer_worker_run) and the rollout server (rollout_server_run),
 * each in a thread of this process on ipc:// sockets, where the GRPO loop runs them as processes.
 * The bench plays the controller: it sends the worker "init" (the model saved to a temporary
 * directory, on --device) and then "publish" with the server's address, as launch/grpo.c does. One
 * publish = on CUDA the GPU weights copied to the worker's host image (sync_host), the float
 * parameters sent as F32 frames in buckets of --bucket-mb over ZeroMQ, the server converting each
 * frame into a staging copy of its weights and, at the last bucket, copying the staging buffer over
 * its weights, each bucket acknowledged. The figure is the controller's publish round trip (mean of
 * --reps after one untimed publish), beside the worker's own "seconds" (which starts after
 * sync_host). The server's engine is on the CPU today (rollout_server_run), so its weights are host
 * memory. The server starts from zeroed weights and the bench checks afterwards that they equal
 * the trainer's bit for bit.
 *
 * Floor: bytes / the copy rate measured here (cudaMemcpy device-to-device on CUDA, memcpy on the
 * CPU): one copy of the weights, what a colocated engine sharing the device would need at least.
 * On CUDA the host memcpy floor is printed too, since today's path stages the bytes in host memory.
 *
 * --ipc (with --device cuda): the colocated GPU path instead. The engine runs on the GPU in a child
 * process (CUDA IPC maps memory of another process only; forked before this process touches CUDA)
 * and publish offers it update_weights_ipc: one device-to-device copy from the trainer's weights.
 * The engine's weights are then in another process, so the bit-for-bit check is not made here
 * (tests/bench/gpu_devrun.sh's GRPO run checks the path end to end: max|dlogp| stays small only
 * if each step's weights arrive).
 *
 * usage: bench_refresh [--device cpu|cuda] [--config configs/models/NAME.json] [--reps R]
 *                      [--bucket-mb MB] [--copy-mib M] [--ipc] */
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "bench_util.h"
#include "common/wire.h"
#include "rollout/server.h"
#include "trainer/model.h"
#include "trainer/worker.h"

typedef struct {
    dsv4_model *m;
    server_config sc;
    int rc;
    mill_err e;
} server_thread;

typedef struct {
    char bind[256];
    int rc;
    mill_err e;
} worker_thread;

static void *server_main(void *p) {
    server_thread *s = p;
    s->rc = rollout_server_run(s->m, &s->sc, &s->e);
    return NULL;
}

static void *worker_main(void *p) {
    worker_thread *w = p;
    w->rc = trainer_worker_run(w->bind, NULL, &w->e);
    return NULL;
}

/* Sends b (freed here) and waits up to timeout_ms for the reply of type want; an "error" reply
 * becomes e. The caller frees *out and *raw. */
static int rpc(void *sock, wire_builder *b, const char *want, int timeout_ms, wire_msg **out, wire_raw **raw,
               mill_err *e) {
    *out = NULL;
    *raw = NULL;
    if (!b) return mill_errf(e, "bench: out of memory for a message");
    int rc = wire_send(sock, NULL, 0, b, e);
    wire_builder_free(b);
    if (rc) return -1;
    int r = wire_recv(sock, 0, timeout_ms, NULL, NULL, out, raw, e);
    if (r == 1) return mill_errf(e, "no \"%s\" reply within %d s", want, timeout_ms / 1000);
    if (r) return -1;
    const char *t = wire_type(*out);
    if (!strcmp(t, "error")) {
        char why[512];
        wire_get_str(*out, "message", 0, "?", why, sizeof why, e);
        return mill_errf(e, "%s", why);
    }
    if (strcmp(t, want)) return mill_errf(e, "got a \"%s\" reply, expected \"%s\"", t, want);
    return 0;
}

static void *dealer(void *ctx, const char *addr, mill_err *e) {
    int linger = 0;
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    if (!s || zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger) || zmq_connect(s, addr)) {
        mill_errf(e, "bench: cannot connect to %s: %s", addr, zmq_strerror(zmq_errno()));
        if (s) zmq_close(s);
        return NULL;
    }
    return s;
}

/* "shutdown" to one of the threads' sockets; a thread that already stopped just does not answer. */
static void shutdown_peer(void *sock) {
    wire_msg *m = NULL;
    wire_raw *raw = NULL;
    mill_err e = {{0}};
    if (sock && rpc(sock, wire_builder_new("shutdown", 9), "bye", 30000, &m, &raw, &e))
        fprintf(stderr, "bench_refresh: shutdown: %s\n", e.msg);
    wire_msg_free(m);
    wire_recv_free(raw);
}

int main(int argc, char **argv) {
    const char *dev = bench_arg(argc, argv, "--device", "cpu"), *cfgp = bench_arg(argc, argv, "--config", "configs/models/dsv4-tiny.json");
    int gpu = !strcmp(dev, "cuda"), reps = atoi(bench_arg(argc, argv, "--reps", "3")),
        mib = atoi(bench_arg(argc, argv, "--copy-mib", gpu ? "1024" : "256"));
    double bucket_mb = atof(bench_arg(argc, argv, "--bucket-mb", "64")); /* the publish default */
    int ipc = 0;
    for (int i = 1; i < argc; i++) ipc |= !strcmp(argv[i], "--ipc");
    if ((!gpu && strcmp(dev, "cpu")) || reps < 1 || mib < 1 || bucket_mb <= 0 || (ipc && !gpu)) {
        fprintf(stderr, "usage: bench_refresh [--device cpu|cuda] [--config FILE] [--reps R] [--bucket-mb MB] [--copy-mib M] "
                        "[--ipc (with cuda)]\n");
        return 2;
    }
    mill_err e = {{0}};
    dsv4_config cfg;
    dsv4_model host = {0}, srv = {0};
    server_thread st = {0};
    worker_thread wt = {0};
    pthread_t sth, wth;
    pid_t child = 0; /* --ipc: the engine's process */
    int have_host = 0, have_srv = 0, srv_up = 0, wrk_up = 0, made_dir = 0, saved = 0, rc = 1;
    void *zctx = NULL, *wsock = NULL, *ssock = NULL;
    wire_msg *r = NULL;
    wire_raw *raw = NULL;
    char dir[200], path[300], saddr[300];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/mill-bench-refresh-XXXXXX", tmp && *tmp && strlen(tmp) < 60 ? tmp : "/tmp");
    double copy_rate = 0, host_rate = 0;
    /* --ipc forks the engine before this process touches CUDA; otherwise a missing device fails fast */
    if (!ipc && (bench_copy_rate(gpu ? DEVICE_CUDA : DEVICE_CPU, (size_t)mib << 20, 5, &copy_rate, &e) ||
                 (gpu && bench_copy_rate(DEVICE_CPU, (size_t)256 << 20, 5, &host_rate, &e))))
        goto done;
    if (config_load(cfgp, &cfg, &e) || model_init(&host, &cfg, &e)) goto done;
    have_host = 1;
    model_init_random(&host, 1, 0.02f);
    if (!mkdtemp(dir)) {
        mill_errf(&e, "bench: cannot create %s", dir);
        goto done;
    }
    made_dir = 1;
    if (model_save(&host, dir, &e)) goto done; /* the worker's init loads it, as a run's does */
    saved = 1;
    /* the engine: zeroed weights of the same layout, so only the publish can make them right */
    if (model_init(&srv, &cfg, &e)) goto done;
    have_srv = 1;
    snprintf(saddr, sizeof saddr, "ipc://%s/engine.sock", dir);
    snprintf(wt.bind, sizeof wt.bind, "ipc://%s/trainer.sock", dir);
    st.m = &srv;
    st.sc = (server_config){.bind = saddr, .cache_budget = (size_t)16 << 20, .max_batch = 8,
                            .device = ipc ? DEVICE_CUDA : DEVICE_CPU};
    if (ipc) {
        fflush(NULL);
        if ((child = fork()) < 0) {
            mill_errf(&e, "bench: cannot fork the engine's process");
            goto done;
        }
        if (!child) {
            int x = rollout_server_run(&srv, &st.sc, &st.e);
            if (x) fprintf(stderr, "bench_refresh: engine: %s\n", st.e.msg);
            _exit(x ? 1 : 0);
        }
        if (bench_copy_rate(DEVICE_CUDA, (size_t)mib << 20, 5, &copy_rate, &e) ||
            bench_copy_rate(DEVICE_CPU, (size_t)256 << 20, 5, &host_rate, &e))
            goto done;
    } else if (pthread_create(&sth, NULL, server_main, &st)) {
        mill_errf(&e, "bench: cannot start the server thread");
        goto done;
    }
    srv_up = 1;
    if (pthread_create(&wth, NULL, worker_main, &wt)) {
        mill_errf(&e, "bench: cannot start the worker thread");
        goto done;
    }
    wrk_up = 1;
    if (!(zctx = zmq_ctx_new())) {
        mill_errf(&e, "bench: cannot create a ZeroMQ context");
        goto done;
    }
    if (!(wsock = dealer(zctx, wt.bind, &e)) || !(ssock = dealer(zctx, saddr, &e))) goto done;
    wire_builder *b = wire_builder_new("init", 1);
    if (b) {
        wire_put_str(b, "model", dir);
        wire_put_str(b, "device", dev);
        wire_put_num(b, "lr", 1e-5);
        wire_put_int(b, "total_steps", 1);
    }
    double t0 = bench_now();
    if (rpc(wsock, b, "ready", 600000, &r, &raw, &e)) {
        mill_err_wrap(&e, "trainer worker init");
        goto done;
    }
    printf("%s on %s: %.1f M float parameters; trainer worker ready in %.1f s\n", cfgp, dev, host.n_floats / 1e6,
           bench_now() - t0);
    wire_msg_free(r);
    wire_recv_free(raw);
    r = NULL;
    raw = NULL;
    double total = 0, worker_s = 0;
    int64_t bytes = 0;
    for (int i = -1; i < reps; i++) { /* i = -1: untimed */
        b = wire_builder_new("publish", (uint64_t)(10 + i));
        if (b) {
            wire_put_str(b, "engines", saddr);
            wire_put_num(b, "bucket_mb", bucket_mb);
            wire_put_num(b, "timeout_s", 600);
            wire_put_bool(b, "ipc", ipc);
        }
        t0 = bench_now();
        double ws = 0;
        char pathname[16];
        if (rpc(wsock, b, "published", 600000, &r, &raw, &e) ||
            wire_get_int(r, "bytes", 1, 0, 0, INT64_MAX, &bytes, &e) ||
            wire_get_num(r, "seconds", 0, 0, 0, 1e9, &ws, &e) ||
            wire_get_str(r, "path", 0, "buckets", pathname, sizeof pathname, &e)) {
            mill_err_wrap(&e, "publish");
            goto done;
        }
        if (ipc && strcmp(pathname, "ipc")) {
            mill_errf(&e, "publish took the %s path, not CUDA IPC (the worker's log says why)", pathname);
            goto done;
        }
        double dt = bench_now() - t0;
        if (i >= 0) {
            total += dt;
            worker_s += ws;
        }
        wire_msg_free(r);
        wire_recv_free(raw);
        r = NULL;
        raw = NULL;
    }
    total /= reps;
    worker_s /= reps;
    /* stop both threads, then check the engine's weights are the trainer's */
    shutdown_peer(wsock);
    shutdown_peer(ssock);
    pthread_join(wth, NULL);
    int status = 0;
    if (ipc) waitpid(child, &status, 0);
    else pthread_join(sth, NULL);
    wrk_up = srv_up = 0;
    child = 0;
    if (wt.rc || st.rc || (ipc && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))) {
        mill_errf(&e, "%s", wt.rc ? wt.e.msg : ipc ? "the engine's process failed (its error is above)" : st.e.msg);
        goto done;
    }
    if (!ipc && memcmp(srv.data, host.data, sizeof(float) * host.n_floats)) {
        mill_errf(&e, "after the publish the engine's weights differ from the trainer's");
        goto done;
    }
    double floor = (double)bytes / copy_rate;
    if (ipc)
        printf("refresh: %.1f MiB of fp32 weights by CUDA IPC (one device-to-device copy into the engine's process): "
               "%.3f s (mean of %d; the worker's own timing %.3f s)\n",
               (double)bytes / (1 << 20), total, reps, worker_s);
    else
        printf("refresh: %.1f MiB of fp32 weights in buckets of %g MiB: %.3f s (mean of %d; the worker's own timing, "
               "after %s: %.3f s); engine weights equal the trainer's\n",
               (double)bytes / (1 << 20), bucket_mb, total, reps, gpu ? "its GPU->host sync" : "nothing", worker_s);
    printf("refresh floor: %.4f s = bytes / %s rate %.1f GB/s (fraction %.4f, %.0fx the floor)\n", floor,
           gpu ? "cudaMemcpy device-to-device" : "host memcpy", copy_rate / 1e9, floor / total, total / floor);
    if (gpu)
        printf("refresh host-copy floor: %.4f s = bytes / host memcpy rate %.1f GB/s (fraction %.4f)\n",
               (double)bytes / host_rate, host_rate / 1e9, (double)bytes / host_rate / total);
    rc = 0;
done:
    if (rc) fprintf(stderr, "bench_refresh: %s\n", e.msg);
    wire_msg_free(r);
    wire_recv_free(raw);
    /* a thread that cannot be told to stop (no socket) is left to the process exit */
    if (wrk_up && wsock) {
        shutdown_peer(wsock);
        pthread_join(wth, NULL);
    }
    if (srv_up && ssock) {
        shutdown_peer(ssock);
        if (ipc) waitpid(child, NULL, 0);
        else pthread_join(sth, NULL);
    } else if (child > 0) {
        kill(child, SIGTERM);
        waitpid(child, NULL, 0);
    }
    if (wsock) zmq_close(wsock);
    if (ssock) zmq_close(ssock);
    if (zctx) zmq_ctx_term(zctx);
    if (saved) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        unlink(path);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        unlink(path);
    }
    if (made_dir) { /* the sockets' files and the directory */
        snprintf(path, sizeof path, "%s/engine.sock", dir);
        unlink(path);
        snprintf(path, sizeof path, "%s/trainer.sock", dir);
        unlink(path);
        rmdir(dir);
    }
    if (have_srv) model_free(&srv);
    if (have_host) model_free(&host);
    return rc;
}
