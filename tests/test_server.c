/* The rollout server end to end over ZeroMQ on loopback: health, stats, greedy generation equal to
 * the HF-checked goldens (n samples, streamed), error replies to malformed and invalid messages
 * while it keeps serving, a client that disconnects mid-request, a bucketed weight update that
 * changes the output, release/resume (with a full update sent while released, which the engine runs
 * after resume), shutdown; a version sent by several senders (test_server_senders); --exact on
 * (test_server_exact). The server
 * runs in a thread of this process. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/wire.h"
#include "rollout/server.h"

typedef struct {
    dsv4_model m;
    server_config sc;
    int rc;
    mill_err e;
    char addr[128];
    wire_curve keys;
} server_arg;

/* A server of tiny-a on an ipc socket named after tag, with fresh CURVE keys and this queue budget
 * (0: the default); started by the caller (server_main). */
static server_arg *tiny_a_server(const char *tag, size_t queue_budget) {
    char dir[512];
    server_arg *a = calloc(1, sizeof *a);
    snprintf(dir, sizeof dir, "%s/tiny-a", MILL_TEST_DATA);
    snprintf(a->addr, sizeof a->addr, "ipc:///tmp/mill-test-server-%s-%d.sock", tag, (int)getpid());
    if (model_load(&a->m, dir, &a->e) || wire_curve_new(&a->keys, &a->e)) fail_msg("%s", a->e.msg);
    a->sc = (server_config){a->addr, (size_t)64 << 20, 8, DEVICE_CPU, &a->keys, queue_budget, NULL, 0, NULL};
    return a;
}

static void *server_main(void *p) {
    server_arg *a = p;
    a->rc = rollout_server_run(&a->m, &a->sc, &a->e);
    return NULL;
}

/* A client with the run's CURVE keys (the server runs with them too); unbounded: no queue limit on
 * its side (set before connecting, when the pipe's limits are fixed). */
static void *connect_client_hwm(void *ctx, const char *addr, const wire_curve *curve, int unbounded) {
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0, tmo = 120000, zero = 0;
    mill_err e;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &tmo, sizeof tmo);
    if (unbounded) {
        zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
        zmq_setsockopt(s, ZMQ_RCVHWM, &zero, sizeof zero);
    }
    if (wire_curve_client(s, curve, &e)) fail_msg("%s", e.msg);
    assert_int_equal(zmq_connect(s, addr), 0);
    return s;
}

static void *connect_client(void *ctx, const char *addr, const wire_curve *curve) {
    return connect_client_hwm(ctx, addr, curve, 0);
}

static void send_msg(void *s, wire_builder *b) {
    mill_err e;
    if (wire_send(s, NULL, 0, b, &e)) fail_msg("%s", e.msg);
    wire_builder_free(b);
}

/* Next reply; the caller frees msg and raw. */
static wire_msg *recv_msg(void *s, wire_raw **raw) {
    wire_msg *m = NULL;
    mill_err e = {{0}};
    int r = wire_recv(s, 0, 120000, NULL, NULL, &m, raw, &e);
    if (r) fail_msg("no reply (%d): %s", r, e.msg);
    return m;
}

/* A reply_simple's flags: released, and weights_missing (a GPU engine resumed without its weights;
 * never on this CPU engine). */
static void assert_flags(const wire_msg *r, int released, int missing) {
    int rel, mis;
    mill_err e;
    if (wire_get_bool(r, "released", 1, 0, &rel, &e) || wire_get_bool(r, "weights_missing", 1, 0, &mis, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(rel, released);
    assert_int_equal(mis, missing);
}

static wire_builder *gen_request(uint64_t id, const int32_t *prompt, int64_t plen, int n, int maxn) {
    wire_builder *b = wire_builder_new("generate", id);
    mill_err e;
    wire_put_int(b, "n", n);
    wire_put_int(b, "max_new_tokens", maxn);
    wire_put_num(b, "temperature", 0.0);
    if (wire_put_frame(b, "prompt", DTYPE_I32, 1, &plen, prompt, &e)) fail_msg("%s", e.msg);
    return b;
}

/* The next reply is of this type: an error naming the version and the sender (NULL: not checked),
 * or an acknowledgement of this version. */
static void expect_reply(void *c, const char *type, int64_t version, const char *sender) {
    wire_raw *raw;
    wire_msg *r = recv_msg(c, &raw);
    char msg[512] = "", want[64];
    mill_err e;
    wire_get_str(r, "message", 0, "", msg, sizeof msg, &e);
    if (strcmp(wire_type(r), type)) fail_msg("expected %s, got %s (%s)", type, wire_type(r), msg);
    if (!strcmp(type, "error")) {
        snprintf(want, sizeof want, "version %lld", (long long)version);
        if (!strstr(msg, want) || (sender && !strstr(msg, sender))) fail_msg("error without version/sender: %s", msg);
    } else if (strcmp(type, "bye")) {
        int64_t v;
        if (wire_get_int(r, "version", 1, 0, 0, INT64_MAX, &v, &e)) fail_msg("%s", e.msg);
        assert_int_equal(v, version);
    }
    wire_msg_free(r);
    wire_recv_free(raw);
}

/* Shuts down server a (run by thread th) through client c: "bye", the thread joined, no error. */
static void server_shutdown(void *c, uint64_t id, pthread_t th, const server_arg *a) {
    send_msg(c, wire_builder_new("shutdown", id));
    expect_reply(c, "bye", 0, NULL);
    pthread_join(th, NULL);
    assert_int_equal(a->rc, 0);
}

static void test_server(void **st) {
    (void)st;
    char dir[1024], path[1100], addr[128];
    snprintf(dir, sizeof dir, "%s/tiny-a", MILL_TEST_DATA);
    snprintf(addr, sizeof addr, "ipc:///tmp/mill-test-server-%d.sock", (int)getpid());
    server_arg *a = calloc(1, sizeof *a);
    if (model_load(&a->m, dir, &a->e)) fail_msg("%s", a->e.msg);
    /* the whole session runs over CURVE with keys saved and loaded as a run's are */
    wire_curve keys, other;
    char kpath[128];
    snprintf(kpath, sizeof kpath, "/tmp/mill-test-server-%d.keys", (int)getpid());
    if (wire_curve_new(&keys, &a->e) || wire_curve_save(&keys, kpath, &a->e) || wire_curve_load(&keys, kpath, &a->e) ||
        wire_curve_new(&other, &a->e))
        fail_msg("%s", a->e.msg);
    unlink(kpath);
    a->sc = (server_config){addr, (size_t)64 << 20, 8, DEVICE_CPU, &keys, 0, NULL, 0, NULL};
    /* golden prompts and HF-checked greedy continuations */
    snprintf(path, sizeof path, "%s/generate.json", dir);
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    json_t *in = json_object_get(g, "input_ids"), *out = json_object_get(g, "output_ids");
    int P = (int)json_array_size(json_array_get(in, 0)), N = (int)json_integer_value(json_object_get(g, "max_new_tokens"));
    int32_t prompt[2][512], want[2][64];
    for (int b = 0; b < 2; b++) {
        for (int t = 0; t < P; t++) prompt[b][t] = (int32_t)json_integer_value(json_array_get(json_array_get(in, b), t));
        for (int t = 0; t < N; t++) want[b][t] = (int32_t)json_integer_value(json_array_get(json_array_get(out, b), t));
    }
    json_decref(g);
    /* the LM head as loaded: a version sent while released puts it back */
    const param_info *hp = model_find_param(&a->m, "head.weight");
    float *head0 = malloc(sizeof(float) * hp->numel);
    memcpy(head0, a->m.data + hp->offset, sizeof(float) * hp->numel);

    pthread_t th;
    pthread_create(&th, NULL, server_main, a);
    void *ctx = zmq_ctx_new();
    void *c = connect_client(ctx, addr, &keys);
    wire_raw *raw;
    wire_msg *r;

    /* clients without the run's keys get nothing: one with other keys fails the handshake (wrong
     * server key), one that knows the server's public key but not the run's client key is refused
     * by the ZAP handler */
    wire_curve impostor = keys;
    assert_int_equal(zmq_curve_keypair(impostor.client_public, impostor.client_secret), 0);
    const wire_curve *strangers[2] = {&other, &impostor};
    for (int i = 0; i < 2; i++) {
        void *stranger = connect_client(ctx, addr, strangers[i]);
        send_msg(stranger, wire_builder_new("health", 99));
        wire_msg *m = NULL;
        wire_raw *rw = NULL;
        mill_err e2 = {{0}};
        assert_int_equal(wire_recv(stranger, 0, 500, NULL, NULL, &m, &rw, &e2), 1);
        wire_recv_free(rw);
        zmq_close(stranger);
    }

    send_msg(c, wire_builder_new("health", 1));
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "health_ok");
    assert_int_equal(wire_id(r), 1);
    assert_flags(r, 0, 0);
    wire_msg_free(r);
    wire_recv_free(raw);

    /* malformed: a header that is not msgpack at all; then an unknown type; server still answers */
    assert_true(zmq_send(c, "\xc1\xc1garbage", 9, 0) == 9);
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "error");
    wire_msg_free(r);
    wire_recv_free(raw);
    send_msg(c, wire_builder_new("frobnicate", 2));
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "error");
    char msg[256];
    mill_err e;
    wire_get_str(r, "message", 1, "", msg, sizeof msg, &e);
    assert_non_null(strstr(msg, "frobnicate"));
    wire_msg_free(r);
    wire_recv_free(raw);
    /* invalid generate: a token outside the vocabulary */
    int32_t bad = 99999;
    send_msg(c, gen_request(3, &bad, 1, 1, 4));
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "error");
    wire_msg_free(r);
    wire_recv_free(raw);

    /* a client that disconnects mid-request (linger so the request is delivered before it goes) */
    void *quitter = connect_client(ctx, addr, &keys);
    int linger = 2000;
    zmq_setsockopt(quitter, ZMQ_LINGER, &linger, sizeof linger);
    send_msg(quitter, gen_request(9, prompt[0], P, 3, N));
    zmq_close(quitter);

    /* two requests in flight at once: greedy = golden, two samples of the first one */
    send_msg(c, gen_request(10, prompt[0], P, 2, N));
    send_msg(c, gen_request(11, prompt[1], P, 1, N));
    int samples = 0, done = 0;
    while (done < 2) {
        r = recv_msg(c, &raw);
        if (!strcmp(wire_type(r), "done")) done++;
        else {
            assert_string_equal(wire_type(r), "sample");
            int row = wire_id(r) == 10 ? 0 : 1;
            const wire_frame *tk = wire_frame_named(r, "tokens"), *rt = wire_frame_named(r, "routing");
            assert_non_null(tk);
            assert_int_equal(tk->shape[0], N);
            assert_memory_equal(tk->data, want[row], sizeof(int32_t) * (size_t)N);
            assert_non_null(rt);
            assert_int_equal(rt->dtype, DTYPE_U8);
            assert_int_equal(rt->shape[1], P + N);
            samples++;
        }
        wire_msg_free(r);
        wire_recv_free(raw);
    }
    assert_int_equal(samples, 3);

    /* weight update in two buckets (version 7): scaling the LM head changes greedy output */
    float *head = malloc(sizeof(float) * hp->numel);
    for (size_t i = 0; i < hp->numel; i++) head[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    wire_builder *b = wire_builder_new("update_weights", 20);
    wire_put_int(b, "version", 7);
    wire_put_int(b, "bucket", 0);
    wire_put_bool(b, "last", 0);
    if (wire_put_frame(b, "head.weight", DTYPE_F32, 2, hp->shape, head, &e)) fail_msg("%s", e.msg);
    send_msg(c, b);
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "bucket_ok");
    wire_msg_free(r);
    wire_recv_free(raw);
    b = wire_builder_new("update_weights", 21);
    wire_put_int(b, "version", 7);
    wire_put_int(b, "bucket", 1);
    wire_put_bool(b, "last", 1);
    send_msg(c, b);
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "weights_ok");
    wire_msg_free(r);
    wire_recv_free(raw);
    send_msg(c, gen_request(22, prompt[0], P, 1, N));
    int differs = 0;
    for (int got = 0; got < 2; got++) {
        r = recv_msg(c, &raw);
        if (!strcmp(wire_type(r), "sample")) {
            int64_t v;
            wire_get_int(r, "weight_version", 1, 0, 0, 1 << 30, &v, &e);
            assert_int_equal(v, 7);
            differs = memcmp(wire_frame_named(r, "tokens")->data, want[0], sizeof(int32_t) * (size_t)N) != 0;
        }
        wire_msg_free(r);
        wire_recv_free(raw);
    }
    assert_true(differs);
    free(head);

    /* a device-to-device update offered to this CPU engine: refused with the reason, weights kept;
     * a malformed one (no handle frame) likewise */
    for (int bad = 0; bad < 2; bad++) {
        unsigned char handle[64] = {0};
        int64_t hshape[1] = {64};
        b = wire_builder_new("update_weights_ipc", 23);
        wire_put_int(b, "version", 8);
        wire_put_int(b, "floats", (int64_t)a->m.n_floats);
        if (!bad && wire_put_frame(b, "handle", DTYPE_U8, 1, hshape, handle, &e)) fail_msg("%s", e.msg);
        send_msg(c, b);
        r = recv_msg(c, &raw);
        assert_string_equal(wire_type(r), "error");
        char why[256];
        wire_get_str(r, "message", 1, NULL, why, sizeof why, &e);
        assert_non_null(strstr(why, bad ? "needs a frame \"handle\"" : "runs on the CPU"));
        wire_msg_free(r);
        wire_recv_free(raw);
    }

    /* release/resume */
    send_msg(c, wire_builder_new("release_memory", 30));
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "released");
    assert_flags(r, 1, 0);
    wire_msg_free(r);
    wire_recv_free(raw);
    send_msg(c, gen_request(31, prompt[0], P, 1, 2));
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "error");
    wire_msg_free(r);
    wire_recv_free(raw);
    /* a whole version (the head as loaded) in one bucket while released: taken now, run after resume */
    b = wire_builder_new("update_weights", 33);
    wire_put_int(b, "version", 8);
    wire_put_int(b, "bucket", 0);
    wire_put_bool(b, "last", 1);
    if (wire_put_frame(b, "head.weight", DTYPE_F32, 2, hp->shape, head0, &e)) fail_msg("%s", e.msg);
    send_msg(c, b);
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "weights_ok");
    wire_msg_free(r);
    wire_recv_free(raw);
    send_msg(c, wire_builder_new("resume", 34));
    r = recv_msg(c, &raw);
    assert_string_equal(wire_type(r), "resumed");
    assert_flags(r, 0, 0);
    wire_msg_free(r);
    wire_recv_free(raw);
    send_msg(c, gen_request(35, prompt[0], P, 1, N));
    for (int got = 0; got < 2; got++) {
        r = recv_msg(c, &raw);
        if (!strcmp(wire_type(r), "sample")) {
            int64_t v;
            wire_get_int(r, "weight_version", 1, 0, 0, 1 << 30, &v, &e);
            assert_int_equal(v, 8);
            assert_memory_equal(wire_frame_named(r, "tokens")->data, want[0], sizeof(int32_t) * (size_t)N);
        } else {
            assert_string_equal(wire_type(r), "done");
        }
        wire_msg_free(r);
        wire_recv_free(raw);
    }
    free(head0);

    send_msg(c, wire_builder_new("stats", 40));
    r = recv_msg(c, &raw);
    int64_t reqs, toks;
    wire_get_int(r, "requests", 1, 0, 0, 1 << 30, &reqs, &e);
    wire_get_int(r, "tokens_generated", 1, 0, 0, 1 << 30, &toks, &e);
    assert_int_equal(reqs, 5); /* quitter's, 10, 11, 22, 35 */
    int64_t ver;
    wire_get_int(r, "weight_version", 1, 0, 0, 1 << 30, &ver, &e);
    assert_int_equal(ver, 8); /* the refused IPC updates changed nothing; the one sent released did */
    assert_int_equal(toks, (3 + 2 + 1 + 1 + 1) * N);
    wire_msg_free(r);
    wire_recv_free(raw);

    server_shutdown(c, 50, th, a);
    zmq_close(c);
    zmq_ctx_term(ctx);
    model_free(&a->m);
    free(a);
}

/* One update_weights message from sender `sender` of `senders`, with tensor p (NULL: none). */
static void send_bucket(void *c, uint64_t id, int64_t version, int64_t bucket, int last, int64_t senders,
                        int64_t sender, const param_info *p, const float *data) {
    mill_err e;
    wire_builder *b = wire_builder_new("update_weights", id);
    wire_put_int(b, "version", version);
    wire_put_int(b, "bucket", bucket);
    wire_put_bool(b, "last", last);
    if (senders != 1 || sender != 0) { /* a single sender leaves them out, as before */
        wire_put_int(b, "senders", senders);
        wire_put_int(b, "sender", sender);
    }
    if (p && wire_put_frame(b, p->name, DTYPE_F32, p->ndim, p->shape, data, &e)) fail_msg("%s", e.msg);
    send_msg(c, b);
}

/* One greedy sample of N tokens: its tokens, logprobs and the version it was admitted under. */
static int64_t generate_one(void *c, uint64_t id, const int32_t *prompt, int P, int N, int32_t *tokens,
                            float *logprobs) {
    wire_raw *raw;
    int64_t v = -1;
    mill_err e;
    send_msg(c, gen_request(id, prompt, P, 1, N));
    for (int got = 0; got < 2; got++) {
        wire_msg *r = recv_msg(c, &raw);
        if (!strcmp(wire_type(r), "sample")) {
            const wire_frame *tk = wire_frame_named(r, "tokens"), *lp = wire_frame_named(r, "logprobs");
            assert_int_equal(tk->shape[0], N);
            memcpy(tokens, tk->data, sizeof(int32_t) * (size_t)N);
            memcpy(logprobs, lp->data, sizeof(float) * (size_t)N);
            wire_get_int(r, "weight_version", 1, 0, 0, INT64_MAX, &v, &e);
        } else {
            assert_string_equal(wire_type(r), "done");
        }
        wire_msg_free(r);
        wire_recv_free(raw);
    }
    return v;
}

/* A correct two-sender version (one tensor each); the engine reports it as running. */
static void two_senders(void *c0, void *c1, int64_t version, const param_info *p0, const float *d0,
                        const param_info *p1, const float *d1) {
    send_bucket(c0, 100, version, 0, 1, 2, 0, p0, d0);
    expect_reply(c0, "bucket_ok", version, NULL);
    send_bucket(c1, 101, version, 0, 1, 2, 1, p1, d1);
    expect_reply(c1, "weights_ok", version, NULL);
    send_msg(c0, wire_builder_new("health", 102));
    wire_raw *raw;
    wire_msg *r = recv_msg(c0, &raw);
    int64_t v;
    mill_err e;
    if (wire_get_int(r, "weight_version", 1, 0, 0, INT64_MAX, &v, &e)) fail_msg("%s", e.msg);
    assert_int_equal(v, version);
    wire_msg_free(r);
    wire_recv_free(raw);
}

/* A version from two senders (the ranks of a sharded trainer): buckets interleave, the swap waits
 * for both lasts (a generate in between runs the old version), and the result equals a one-sender
 * update of the same tensors; each multi-sender error drops the version and the next one is taken. */
static void test_server_senders(void **st) {
    (void)st;
    char dir[1024], path[1100];
    snprintf(dir, sizeof dir, "%s/tiny-a", MILL_TEST_DATA);
    server_arg *a = tiny_a_server("senders", 0);
    snprintf(path, sizeof path, "%s/generate.json", dir);
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    json_t *in = json_object_get(g, "input_ids"), *out = json_object_get(g, "output_ids");
    int P = (int)json_array_size(json_array_get(in, 0)), N = (int)json_integer_value(json_object_get(g, "max_new_tokens"));
    int32_t prompt[512], want[64];
    for (int t = 0; t < P; t++) prompt[t] = (int32_t)json_integer_value(json_array_get(json_array_get(in, 0), t));
    for (int t = 0; t < N; t++) want[t] = (int32_t)json_integer_value(json_array_get(json_array_get(out, 0), t));
    json_decref(g);
    /* four tensors: sender 0 owns the first two, sender 1 the others; new values change the output */
    const char *names[4] = {"head.weight", "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
                            "layers.1.attn.compressor.wkv.weight"};
    const param_info *tp[4];
    float *orig[4], *next[4];
    for (int i = 0; i < 4; i++) {
        tp[i] = model_find_param(&a->m, names[i]);
        assert_non_null(tp[i]);
        orig[i] = malloc(sizeof(float) * tp[i]->numel);
        next[i] = malloc(sizeof(float) * tp[i]->numel);
        memcpy(orig[i], a->m.data + tp[i]->offset, sizeof(float) * tp[i]->numel);
        for (size_t j = 0; j < tp[i]->numel; j++)
            next[i][j] = i ? orig[i][j] * 1.25f + 0.01f : (float)((j * 2654435761u) % 1000) / 1000.0f - 0.5f;
    }
    float *poison = calloc(tp[0]->numel, sizeof(float)); /* what a dropped version would have put in the head */

    pthread_t th;
    pthread_create(&th, NULL, server_main, a);
    void *ctx = zmq_ctx_new();
    void *c0 = connect_client(ctx, a->addr, &a->keys), *c1 = connect_client(ctx, a->addr, &a->keys);
    int32_t tok[64], tok7[64];
    float lp[64], lp7[64];

    /* version 7: sender 1's first bucket, sender 0's two, a generate (still version 0), sender 1's last */
    send_bucket(c1, 1, 7, 0, 0, 2, 1, tp[2], next[2]);
    expect_reply(c1, "bucket_ok", 7, NULL);
    send_bucket(c0, 2, 7, 0, 0, 2, 0, tp[0], next[0]);
    expect_reply(c0, "bucket_ok", 7, NULL);
    send_bucket(c0, 3, 7, 1, 1, 2, 0, tp[1], next[1]);
    expect_reply(c0, "bucket_ok", 7, NULL); /* its last, but sender 1's is still to come */
    assert_int_equal(generate_one(c0, 4, prompt, P, N, tok, lp), 0);
    assert_memory_equal(tok, want, sizeof(int32_t) * (size_t)N);
    send_bucket(c1, 5, 7, 1, 1, 2, 1, tp[3], next[3]);
    expect_reply(c1, "weights_ok", 7, NULL); /* to the sender that completed it */
    assert_int_equal(generate_one(c0, 6, prompt, P, N, tok7, lp7), 7);
    assert_true(memcmp(tok7, want, sizeof(int32_t) * (size_t)N) != 0);
    float *w7 = malloc(sizeof(float) * a->m.n_floats); /* the host copy the engine runs (CPU) */
    memcpy(w7, a->m.data, sizeof(float) * a->m.n_floats);

    /* one sender: back to the loaded values (golden output), then the same four tensors as version 7 */
    wire_builder *b = wire_builder_new("update_weights", 10);
    mill_err e;
    wire_put_int(b, "version", 8);
    wire_put_int(b, "bucket", 0);
    wire_put_bool(b, "last", 1);
    for (int i = 0; i < 4; i++)
        if (wire_put_frame(b, tp[i]->name, DTYPE_F32, tp[i]->ndim, tp[i]->shape, orig[i], &e)) fail_msg("%s", e.msg);
    send_msg(c0, b);
    expect_reply(c0, "weights_ok", 8, NULL);
    assert_int_equal(generate_one(c0, 11, prompt, P, N, tok, lp), 8);
    assert_memory_equal(tok, want, sizeof(int32_t) * (size_t)N);
    for (int i = 0; i < 4; i++) send_bucket(c0, 12, 9, i, i == 3, 1, 0, tp[i], next[i]);
    for (int i = 0; i < 4; i++) expect_reply(c0, i == 3 ? "weights_ok" : "bucket_ok", 9, NULL);
    assert_int_equal(generate_one(c0, 13, prompt, P, N, tok, lp), 9);
    assert_memory_equal(tok, tok7, sizeof(int32_t) * (size_t)N);
    assert_memory_equal(lp, lp7, sizeof(float) * (size_t)N);
    assert_memory_equal(a->m.data, w7, sizeof(float) * a->m.n_floats);

    /* errors: each answers `error` naming the version and the sender, drops what was staged (the
     * next version's first bucket would otherwise clash with it), and the next version is taken */
    /* senders differing within a version */
    send_bucket(c0, 20, 10, 0, 0, 2, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 10, NULL);
    send_bucket(c1, 21, 10, 0, 1, 3, 1, NULL, NULL);
    expect_reply(c1, "error", 10, "sender 1");
    two_senders(c0, c1, 11, tp[1], next[1], tp[2], next[2]);
    /* sender out of range: one past the end while staging, a negative one with nothing staged */
    send_bucket(c0, 22, 12, 0, 0, 2, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 12, NULL);
    send_bucket(c1, 23, 12, 0, 1, 2, 2, NULL, NULL);
    expect_reply(c1, "error", 12, "sender 2");
    send_bucket(c1, 24, 13, 0, 1, 2, -1, NULL, NULL);
    expect_reply(c1, "error", 13, "sender -1");
    two_senders(c0, c1, 14, tp[1], next[1], tp[2], next[2]);
    /* a second last from one sender */
    send_bucket(c0, 25, 15, 0, 1, 2, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 15, NULL);
    send_bucket(c0, 26, 15, 1, 1, 2, 0, NULL, NULL);
    expect_reply(c0, "error", 15, "sender 0");
    two_senders(c0, c1, 16, tp[1], next[1], tp[2], next[2]);
    /* a bucket after the sender's last */
    send_bucket(c1, 27, 17, 0, 1, 2, 1, tp[0], poison);
    expect_reply(c1, "bucket_ok", 17, NULL);
    send_bucket(c1, 28, 17, 1, 0, 2, 1, NULL, NULL);
    expect_reply(c1, "error", 17, "sender 1");
    two_senders(c0, c1, 18, tp[1], next[1], tp[2], next[2]);
    /* one tensor from two senders, and twice from one sender */
    send_bucket(c0, 29, 19, 0, 0, 2, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 19, NULL);
    send_bucket(c1, 30, 19, 0, 0, 2, 1, tp[0], poison);
    expect_reply(c1, "error", 19, "sender 1");
    two_senders(c0, c1, 20, tp[1], next[1], tp[2], next[2]);
    send_bucket(c1, 31, 21, 0, 0, 2, 1, tp[0], poison);
    expect_reply(c1, "bucket_ok", 21, NULL);
    send_bucket(c1, 32, 21, 1, 1, 2, 1, tp[0], poison);
    expect_reply(c1, "error", 21, "sender 1");
    two_senders(c0, c1, 22, tp[1], next[1], tp[2], next[2]);
    /* a bucket of another version while one is staged (the rule of one sender): both dropped */
    send_bucket(c0, 33, 23, 0, 0, 2, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 23, NULL);
    send_bucket(c1, 34, 24, 0, 1, 2, 1, NULL, NULL);
    expect_reply(c1, "error", 24, "sender 1");
    two_senders(c0, c1, 25, tp[1], next[1], tp[2], next[2]);
    /* a bucket with a bad frame (a wrong shape) drops the version it belongs to: the next is taken */
    send_bucket(c0, 38, 27, 0, 0, 2, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 27, NULL);
    {
        mill_err e;
        int64_t bad[1] = {1};
        b = wire_builder_new("update_weights", 39);
        wire_put_int(b, "version", 27), wire_put_int(b, "bucket", 0), wire_put_bool(b, "last", 1);
        wire_put_int(b, "senders", 2), wire_put_int(b, "sender", 1);
        if (wire_put_frame(b, tp[1]->name, DTYPE_F32, 1, bad, poison, &e)) fail_msg("%s", e.msg);
        send_msg(c1, b);
        wire_raw *raw;
        wire_msg *r = recv_msg(c1, &raw);
        char msg[512] = "";
        assert_string_equal(wire_type(r), "error");
        wire_get_str(r, "message", 1, NULL, msg, sizeof msg, &e);
        if (!strstr(msg, "wrong shape") || !strstr(msg, "version dropped")) fail_msg("bad frame: %s", msg);
        wire_msg_free(r);
        wire_recv_free(raw);
    }
    two_senders(c0, c1, 28, tp[1], next[1], tp[2], next[2]);
    /* one sender may still send a tensor twice in a version (the later one counts), as before */
    send_bucket(c0, 35, 26, 0, 0, 1, 0, tp[0], poison);
    expect_reply(c0, "bucket_ok", 26, NULL);
    send_bucket(c0, 36, 26, 1, 1, 1, 0, tp[0], next[0]);
    expect_reply(c0, "weights_ok", 26, NULL);
    /* no poison landed: the weights are version 7's, and so is the output */
    assert_memory_equal(a->m.data, w7, sizeof(float) * a->m.n_floats);
    assert_int_equal(generate_one(c0, 37, prompt, P, N, tok, lp), 26);
    assert_memory_equal(tok, tok7, sizeof(int32_t) * (size_t)N);
    assert_memory_equal(lp, lp7, sizeof(float) * (size_t)N);

    /* a sharded device-to-device update offered to this CPU engine: refused with the reason */
    unsigned char handle[64] = {0};
    int64_t hshape[1] = {64};
    b = wire_builder_new("update_weights_ipc", 40);
    wire_put_int(b, "version", 27);
    wire_put_int(b, "floats", 64);
    wire_put_int(b, "offset", 16);
    wire_put_int(b, "senders", 2);
    wire_put_int(b, "sender", 1);
    if (wire_put_frame(b, "handle", DTYPE_U8, 1, hshape, handle, &e)) fail_msg("%s", e.msg);
    send_msg(c1, b);
    wire_raw *raw;
    wire_msg *r = recv_msg(c1, &raw);
    assert_string_equal(wire_type(r), "error");
    char why[256];
    wire_get_str(r, "message", 1, NULL, why, sizeof why, &e);
    assert_non_null(strstr(why, "runs on the CPU"));
    wire_msg_free(r);
    wire_recv_free(raw);

    server_shutdown(c0, 50, th, a);
    zmq_close(c0);
    zmq_close(c1);
    zmq_ctx_term(ctx);
    for (int i = 0; i < 4; i++) {
        free(orig[i]);
        free(next[i]);
    }
    free(poison);
    free(w7);
    model_free(&a->m);
    free(a);
}

/* This process's resident memory in KiB (the server runs in it, on a thread). */
static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kib = strtol(line + 6, NULL, 10);
    if (f) fclose(f);
    return kib;
}

/* A flood: 10,000 generate requests sent at once to a server whose queue may take 256 KiB. Each
 * request gets one answer: its sample and done, or error "busy" (backpressure) with nothing
 * queued; the server's memory stays bounded, and it serves again once the queue drains. */
static void test_server_flood(void **st) {
    (void)st;
    server_arg *a = tiny_a_server("flood", (size_t)256 << 10);
    pthread_t th;
    pthread_create(&th, NULL, server_main, a);
    /* no queue limit on the client's side: the flood reaches the server as fast as it can take it */
    void *ctx = zmq_ctx_new(), *c = connect_client_hwm(ctx, a->addr, &a->keys, 1);
    int32_t prompt[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    long before = rss_kib(), peak = before;
    enum { R = 10000 };
    int done = 0, busy = 0, other = 0, sent = 0, reading = 0;
    while (done + busy + other < R) { /* send as fast as it goes; every answer that came is read first */
        if (sent < R && !reading) send_msg(c, gen_request((uint64_t)(1000 + sent++), prompt, 8, 1, 4));
        wire_raw *raw = NULL;
        wire_msg *r = NULL;
        mill_err re;
        int got = wire_recv(c, 0, sent < R ? 0 : 120000, NULL, NULL, &r, &raw, &re);
        reading = got == 0;
        if (got == 1 && sent < R) continue;
        if (got) fail_msg("flood: no reply (%d) after %d sent, %d done, %d busy: %s", got, sent, done, busy, re.msg);
        const char *t = wire_type(r);
        char msg[512] = "";
        mill_err e;
        if (!strcmp(t, "done")) done++;
        else if (!strcmp(t, "error")) {
            wire_get_str(r, "message", 0, "", msg, sizeof msg, &e);
            if (strstr(msg, "busy")) busy++;
            else other++, fprintf(stderr, "flood: %s\n", msg);
        }
        wire_msg_free(r);
        wire_recv_free(raw);
        long now = rss_kib();
        peak = now > peak ? now : peak;
    }
    printf("# flood: %d requests, %d served, %d refused busy; RSS %ld KiB before, peak %ld KiB (+%ld)\n", R, done, busy,
           before, peak, peak - before);
    assert_int_equal(other, 0);
    assert_true(done > 0 && busy > 0);
    assert_true(peak - before < 64 * 1024); /* the 10,000 requests never all sit in memory */
    int32_t tok[4];
    float lp[4];
    (void)generate_one(c, 99999, prompt, 8, 4, tok, lp); /* drained: served again */
    server_shutdown(c, 100000, th, a);
    zmq_close(c);
    zmq_ctx_term(ctx);
    model_free(&a->m);
    free(a);
}

/* n samples of one prompt at temperature 0.8 (seed 5): tokens, logprobs and routing (U8 [layers,
 * P + N, k]) by sample index. */
static void sample_request(void *c, uint64_t id, const int32_t *prompt, int P, int n, int N, int32_t *tok, float *lp,
                           uint8_t *rt, size_t rt_bytes) {
    wire_builder *b = wire_builder_new("generate", id);
    mill_err e;
    int64_t plen = P;
    wire_put_int(b, "n", n);
    wire_put_int(b, "max_new_tokens", N);
    wire_put_num(b, "temperature", 0.8);
    wire_put_int(b, "seed", 5);
    if (wire_put_frame(b, "prompt", DTYPE_I32, 1, &plen, prompt, &e)) fail_msg("%s", e.msg);
    send_msg(c, b);
    for (int got = 0; got <= n; got++) {
        wire_raw *raw;
        wire_msg *r = recv_msg(c, &raw);
        int64_t i;
        if (!strcmp(wire_type(r), "sample")) {
            const wire_frame *tk = wire_frame_named(r, "tokens"), *lf = wire_frame_named(r, "logprobs");
            const wire_frame *rf = wire_frame_named(r, "routing");
            if (wire_get_int(r, "index", 1, 0, 0, n - 1, &i, &e)) fail_msg("%s", e.msg);
            assert_int_equal(tk->shape[0], N);
            assert_int_equal(rf->dtype, DTYPE_U8);
            assert_int_equal(rf->nbytes, rt_bytes);
            memcpy(tok + i * N, tk->data, sizeof(int32_t) * (size_t)N);
            memcpy(lp + i * N, lf->data, sizeof(float) * (size_t)N);
            memcpy(rt + i * rt_bytes, rf->data, rt_bytes);
        } else {
            assert_string_equal(wire_type(r), "done");
        }
        wire_msg_free(r);
        wire_recv_free(raw);
    }
}

/* --exact on: each sample's logprobs are the trainer's forward's for its tokens (the training step's
 * function, model_forward_backward_tokens, run here on the sample's tokens with its routing
 * replayed at temperature 0.8), to the bit, and stats count the samples; an ordinary server's
 * decode logprobs are close to them (on this CPU they may differ in the last bits: OpenBLAS's
 * kernels and the thread count decide) and its tokens are the same. */
static void test_server_exact(void **st) {
    (void)st;
    enum { P = 6, N = 9, NS = 3 };
    int32_t prompt[P] = {5, 9, 2, 7, 1, 3}, tok[2][NS * N];
    float lp[2][NS * N];
    server_arg *a = NULL;
    uint8_t *rt = NULL;
    size_t rt_bytes = 0;
    for (int x = 0; x < 2; x++) {
        a = tiny_a_server(x ? "exact-on" : "exact-off", 0);
        a->sc.exact = x;
        const dsv4_config *cf = &a->m.cfg;
        rt_bytes = (size_t)cf->num_hidden_layers * (P + N) * cf->num_experts_per_tok;
        if (!rt) rt = malloc(NS * rt_bytes);
        pthread_t th;
        pthread_create(&th, NULL, server_main, a);
        void *ctx = zmq_ctx_new(), *c = connect_client(ctx, a->addr, &a->keys);
        sample_request(c, 1, prompt, P, NS, N, tok[x], lp[x], rt, rt_bytes);
        send_msg(c, wire_builder_new("stats", 3));
        wire_raw *raw;
        wire_msg *r = recv_msg(c, &raw);
        int64_t rescored;
        mill_err e;
        if (wire_get_int(r, "exact_samples", 1, 0, 0, 1 << 30, &rescored, &e)) fail_msg("%s", e.msg);
        assert_int_equal(rescored, x ? NS : 0);
        wire_msg_free(r);
        wire_recv_free(raw);
        server_shutdown(c, 4, th, a);
        zmq_close(c);
        zmq_ctx_term(ctx);
        if (!x) {
            model_free(&a->m);
            free(a);
        }
    }
    /* the trainer's function on the exact server's samples (a still holds its model) */
    const dsv4_config *cf = &a->m.cfg;
    int L = cf->num_hidden_layers, K = cf->num_experts_per_tok, T = P + N;
    kctx k;
    arena ar;
    mill_err e;
    if (kctx_init(&k, DEVICE_CPU, &e) || arena_init(&ar, 1 << 20, &e)) fail_msg("%s", e.msg);
    double maxd = 0;
    for (int i = 0; i < NS; i++) {
        int32_t ids[P + N], tg[P + N], rp[64 * (P + N) * 8];
        float want[N];
        assert_true(L * T * K <= (int)(sizeof rp / sizeof rp[0]));
        memcpy(ids, prompt, sizeof prompt);
        memcpy(ids + P, tok[1] + i * N, sizeof(int32_t) * N);
        for (int t = 0; t < T; t++) tg[t] = t >= P - 1 && t < T - 1 ? ids[t + 1] : -1;
        for (long j = 0; j < (long)L * T * K; j++) rp[j] = rt[i * rt_bytes + j];
        double loss;
        long count;
        if (model_forward_backward_tokens(&a->m, &k, ids, tg, 1, T, rp, 0.8f, NULL, NULL, NULL, want, &loss, &count,
                                          &ar, &e))
            fail_msg("%s", e.msg);
        assert_int_equal(count, N);
        assert_memory_equal(want, lp[1] + i * N, sizeof want);
        for (int j = 0; j < N; j++) maxd = fmax(maxd, fabs((double)lp[0][i * N + j] - lp[1][i * N + j]));
    }
    printf("# exact: %d samples of %d tokens equal the trainer's forward; decode's logprobs within %.2e\n", NS, N,
           maxd);
    assert_memory_equal(tok[0], tok[1], sizeof tok[0]);
    assert_true(maxd <= 1e-4);
    int distinct = 0; /* the draws differ between samples: temperature and seeds reached the engine */
    for (int i = 1; i < NS; i++) distinct += memcmp(tok[1], tok[1] + i * N, sizeof(int32_t) * N) != 0;
    assert_true(distinct > 0);
    arena_free(&ar);
    kctx_free(&k);
    model_free(&a->m);
    free(a);
    free(rt);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_server), cmocka_unit_test(test_server_senders),
                                       cmocka_unit_test(test_server_flood), cmocka_unit_test(test_server_exact)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
