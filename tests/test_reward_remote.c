/* tests/test_reward_remote.c — the HTTP reward client against a small HTTP/1.1 server that
 * runs in this process (POSIX sockets + a pthread on 127.0.0.1, an ephemeral port), scores
 * with verify_math_reward, and can misbehave on purpose: 5xx, silence, 404, bad JSON, a
 * reply of the wrong length or type. Checks results, request counts (retries) and time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "algos/reward_remote.h"
#include "algos/verify.h"

/* ---- the test server ---- */

typedef enum { SRV_SCORE, SRV_FAIL_TWICE, SRV_SILENT, SRV_404, SRV_MALFORMED, SRV_SHORT, SRV_NOT_NUMBER } srv_mode;

typedef struct {
    int fd, port;
    srv_mode mode;
    atomic_int requests, stop;
    pthread_t th;
    pthread_mutex_t mu;
    char *last_body; /* the last request's body, under mu */
} srv;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Waits up to 50 ms for the socket to be readable; 1 readable, 0 not yet, -1 stop. */
static int srv_wait(srv *s, int fd) {
    if (atomic_load(&s->stop)) return -1;
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 50) > 0 ? 1 : 0;
}

/* Reads one request (headers, then Content-Length bytes of body). The body, malloc'd, or NULL
 * when the peer went away, the request is malformed, or it took over 5 s. */
static char *srv_read_request(srv *s, int c) {
    size_t cap = 1 << 16, n = 0, need = 0, body_at = 0;
    char *buf = malloc(cap + 1);
    double t0 = now_s();
    while (buf && now_s() - t0 < 5.0) {
        if (body_at && n >= body_at + need) {
            memmove(buf, buf + body_at, need);
            buf[need] = 0;
            return buf;
        }
        int w = srv_wait(s, c);
        if (w < 0) break;
        if (w == 0) continue;
        if (n == cap) {
            char *p = realloc(buf, 2 * cap + 1);
            if (!p) break;
            buf = p;
            cap *= 2;
        }
        ssize_t k = recv(c, buf + n, cap - n, 0);
        if (k <= 0) break;
        n += (size_t)k;
        buf[n] = 0;
        if (!body_at) {
            char *end = strstr(buf, "\r\n\r\n");
            if (!end) continue;
            body_at = (size_t)(end - buf) + 4;
            *end = 0;
            for (char *h = buf; *h; h++) *h = (char)(*h >= 'A' && *h <= 'Z' ? *h - 'A' + 'a' : *h);
            char *cl = strstr(buf, "\r\ncontent-length:");
            if (!cl) break;
            need = strtoul(cl + 17, NULL, 10);
        }
    }
    free(buf);
    return NULL;
}

static void srv_reply(int c, int status, const char *body) {
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                      status, status == 200 ? "OK" : status == 404 ? "Not Found" : "Internal Server Error", strlen(body));
    send(c, head, (size_t)hl, MSG_NOSIGNAL);
    send(c, body, strlen(body), MSG_NOSIGNAL);
}

/* {"rewards":[...]} by verify_math_reward, dropping the last one when short. */
static char *srv_score(const char *req, int short_by_one) {
    json_error_t je;
    json_t *root = json_loads(req, 0, &je), *out = json_array();
    json_t *samples = json_object_get(root, "samples");
    size_t n = json_array_size(samples);
    for (size_t i = 0; i + (short_by_one ? 1 : 0) < n; i++) {
        json_t *o = json_array_get(samples, i);
        const char *resp = json_string_value(json_object_get(o, "response"));
        const char *lab = json_string_value(json_object_get(o, "label"));
        json_array_append_new(out, json_real(verify_math_reward(resp ? resp : "", lab ? lab : "")));
    }
    json_t *r = json_pack("{s:o}", "rewards", out);
    char *text = json_dumps(r, JSON_COMPACT);
    json_decref(r);
    json_decref(root);
    return text;
}

static void srv_handle(srv *s, int c) {
    char *body = srv_read_request(s, c);
    if (!body) return;
    int k = atomic_fetch_add(&s->requests, 1);
    pthread_mutex_lock(&s->mu);
    free(s->last_body);
    s->last_body = strdup(body);
    pthread_mutex_unlock(&s->mu);
    char *text = NULL;
    switch (s->mode) {
    case SRV_FAIL_TWICE:
        if (k < 2) {
            srv_reply(c, 500, "{\"error\":\"overloaded\"}");
            break;
        }
        /* fall through */
    case SRV_SCORE:
        text = srv_score(body, 0);
        srv_reply(c, 200, text ? text : "{}");
        break;
    case SRV_SHORT:
        text = srv_score(body, 1);
        srv_reply(c, 200, text ? text : "{}");
        break;
    case SRV_SILENT: /* read, never answer; hold the connection until the client gives up */
        for (char sink[256];;) {
            int w = srv_wait(s, c);
            if (w < 0 || (w > 0 && recv(c, sink, sizeof sink, 0) <= 0)) break;
        }
        break;
    case SRV_404:
        srv_reply(c, 404, "{\"error\":\"no such route\"}");
        break;
    case SRV_MALFORMED:
        srv_reply(c, 200, "{\"rewards\": [1, 0,");
        break;
    case SRV_NOT_NUMBER:
        srv_reply(c, 200, "{\"rewards\": [1, \"0\", 1, 0, 1]}");
        break;
    }
    free(text);
    free(body);
}

static void *srv_main(void *arg) {
    srv *s = arg;
    while (!atomic_load(&s->stop)) {
        if (srv_wait(s, s->fd) <= 0) continue;
        int c = accept(s->fd, NULL, NULL);
        if (c < 0) continue;
        srv_handle(s, c);
        close(c);
    }
    return NULL;
}

/* A socket bound to 127.0.0.1 on an ephemeral port; its port in *port. */
static int bind_loopback(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static srv *srv_start(srv_mode mode) {
    srv *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->mode = mode;
    s->fd = bind_loopback(&s->port);
    assert_true(s->fd >= 0);
    assert_int_equal(listen(s->fd, 16), 0);
    pthread_mutex_init(&s->mu, NULL);
    assert_int_equal(pthread_create(&s->th, NULL, srv_main, s), 0);
    return s;
}

static void srv_stop(srv *s) {
    atomic_store(&s->stop, 1);
    pthread_join(s->th, NULL);
    close(s->fd);
    pthread_mutex_destroy(&s->mu);
    free(s->last_body);
    free(s);
}

/* The request count, once it reaches want (the server may count a beat after the client
 * has given up on a silent reply) or 2 s pass. */
static int srv_requests(srv *s, int want) {
    double t0 = now_s();
    while (atomic_load(&s->requests) < want && now_s() - t0 < 2.0) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return atomic_load(&s->requests);
}

static remote_reward_config config(int port, double timeout_s, int retries, double backoff_s) {
    remote_reward_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.url, sizeof c.url, "http://127.0.0.1:%d/score", port);
    c.timeout_s = timeout_s;
    c.retries = retries;
    c.backoff_s = backoff_s;
    return c;
}

/* ---- the cases ---- */

static const char *const prompts[5] = {"What is 2+2?", "Half of one?", "7+1?", "Ten?", "1+2?"};
static const char *const responses[5] = {"\\boxed{4}", "so it is $\\boxed{\\frac12}$", "Answer: 7",
                                         "\\boxed{10} \xff\xfe (bad UTF-8)", "no idea"};
static const char *const labels[5] = {"4", "0.5", "8", "10", "3"};
static const float expected[5] = {1, 1, 0, 1, 0};

static void test_happy_path(void **state) {
    (void)state;
    srv *s = srv_start(SRV_SCORE);
    remote_reward_config c = config(s->port, 5.0, 2, 0.01);
    float r[5];
    mill_err e = {{0}};
    int rc = reward_remote_score(&c, prompts, responses, labels, 5, r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    for (int i = 0; i < 5; i++) assert_true(r[i] == expected[i]);
    assert_int_equal(srv_requests(s, 1), 1);
    /* the request as the server saw it: every field, and U+FFFD for the bad bytes */
    pthread_mutex_lock(&s->mu);
    json_error_t je;
    json_t *req = json_loads(s->last_body, 0, &je);
    pthread_mutex_unlock(&s->mu);
    assert_non_null(req);
    json_t *samples = json_object_get(req, "samples");
    assert_int_equal(json_array_size(samples), 5);
    assert_string_equal(json_string_value(json_object_get(json_array_get(samples, 0), "prompt")), prompts[0]);
    assert_string_equal(json_string_value(json_object_get(json_array_get(samples, 2), "label")), labels[2]);
    assert_string_equal(json_string_value(json_object_get(json_array_get(samples, 3), "response")),
                        "\\boxed{10} \xef\xbf\xbd\xef\xbf\xbd (bad UTF-8)");
    json_decref(req);
    /* NULL prompts and labels go as null; n == 0 sends nothing */
    assert_int_equal(reward_remote_score(&c, NULL, responses, NULL, 2, r, &e), 0);
    assert_true(r[0] == 0.0f && r[1] == 0.0f); /* no label: nothing is right */
    assert_int_equal(reward_remote_score(&c, prompts, responses, labels, 0, r, &e), 0);
    assert_int_equal(srv_requests(s, 2), 2);
    srv_stop(s);
}

static void test_retries_5xx(void **state) {
    (void)state;
    srv *s = srv_start(SRV_FAIL_TWICE);
    remote_reward_config c = config(s->port, 5.0, 3, 0.01);
    float r[5];
    mill_err e = {{0}};
    int rc = reward_remote_score(&c, prompts, responses, labels, 5, r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(srv_requests(s, 3), 3); /* 500, 500, 200 */
    for (int i = 0; i < 5; i++) assert_true(r[i] == expected[i]);
    srv_stop(s);

    /* one retry is not enough for two failures */
    s = srv_start(SRV_FAIL_TWICE);
    c = config(s->port, 5.0, 1, 0.01);
    assert_int_equal(reward_remote_score(&c, prompts, responses, labels, 5, r, &e), -1);
    print_message("error: %s\n", e.msg);
    assert_non_null(strstr(e.msg, c.url));
    assert_non_null(strstr(e.msg, "2 attempts"));
    assert_non_null(strstr(e.msg, "HTTP 500"));
    assert_int_equal(srv_requests(s, 2), 2);
    srv_stop(s);
}

static void test_timeout(void **state) {
    (void)state;
    srv *s = srv_start(SRV_SILENT);
    remote_reward_config c = config(s->port, 0.3, 2, 0.05);
    float r[5];
    mill_err e = {{0}};
    double t0 = now_s();
    assert_int_equal(reward_remote_score(&c, prompts, responses, labels, 5, r, &e), -1);
    double dt = now_s() - t0;
    print_message("error after %.2f s: %s\n", dt, e.msg);
    /* 3 attempts of 0.3 s and backoffs of 0.05 + 0.1 s */
    assert_true(dt >= 0.9 && dt < 4.0);
    assert_non_null(strstr(e.msg, c.url));
    assert_non_null(strstr(e.msg, "3 attempts"));
    assert_int_equal(srv_requests(s, 3), 3);
    srv_stop(s);
}

static void test_404_no_retry(void **state) {
    (void)state;
    srv *s = srv_start(SRV_404);
    remote_reward_config c = config(s->port, 5.0, 3, 0.5);
    float r[5];
    mill_err e = {{0}};
    double t0 = now_s();
    assert_int_equal(reward_remote_score(&c, prompts, responses, labels, 5, r, &e), -1);
    assert_true(now_s() - t0 < 0.5); /* no backoff slept */
    print_message("error: %s\n", e.msg);
    assert_non_null(strstr(e.msg, c.url));
    assert_non_null(strstr(e.msg, "HTTP 404"));
    assert_non_null(strstr(e.msg, "expected 200"));
    assert_int_equal(srv_requests(s, 1), 1);
    srv_stop(s);
}

/* A 200 with a bad body is an error at once, and rewards are left as they were. */
static void bad_reply(srv_mode mode, const char *want) {
    srv *s = srv_start(mode);
    remote_reward_config c = config(s->port, 5.0, 3, 0.01);
    float r[5] = {-9, -9, -9, -9, -9};
    mill_err e = {{0}};
    assert_int_equal(reward_remote_score(&c, prompts, responses, labels, 5, r, &e), -1);
    print_message("error: %s\n", e.msg);
    assert_non_null(strstr(e.msg, c.url));
    assert_non_null(strstr(e.msg, want));
    for (int i = 0; i < 5; i++) assert_true(r[i] == -9.0f);
    assert_int_equal(srv_requests(s, 1), 1);
    srv_stop(s);
}

static void test_malformed_json(void **state) {
    (void)state;
    bad_reply(SRV_MALFORMED, "not JSON");
}

static void test_wrong_length(void **state) {
    (void)state;
    bad_reply(SRV_SHORT, "4 rewards; expected one per sample, 5");
}

static void test_not_a_number(void **state) {
    (void)state;
    bad_reply(SRV_NOT_NUMBER, "reward 1 is not a finite number");
}

static void test_connection_refused(void **state) {
    (void)state;
    int port = 0;
    int fd = bind_loopback(&port); /* bound, never listening, then closed: nothing there */
    assert_true(fd >= 0);
    close(fd);
    remote_reward_config c = config(port, 2.0, 2, 0.01);
    float r[5];
    mill_err e = {{0}};
    double t0 = now_s();
    assert_int_equal(reward_remote_score(&c, prompts, responses, labels, 5, r, &e), -1);
    print_message("error: %s\n", e.msg);
    assert_true(now_s() - t0 < 2.0);
    assert_non_null(strstr(e.msg, c.url));
    assert_non_null(strstr(e.msg, "3 attempts"));
    assert_non_null(strstr(e.msg, "connect"));
}

static void test_bad_arguments(void **state) {
    (void)state;
    remote_reward_config c = config(1, 1.0, 0, 0.0);
    float r[2];
    mill_err e = {{0}};
    const char *const with_null[2] = {"a", NULL};
    assert_int_equal(reward_remote_score(&c, NULL, with_null, NULL, 2, r, &e), -1);
    assert_non_null(strstr(e.msg, "response 1 is NULL"));
    assert_int_equal(reward_remote_score(&c, NULL, NULL, NULL, 1, r, &e), -1);
    assert_int_equal(reward_remote_score(&c, NULL, with_null, NULL, -1, r, &e), -1);
    c.url[0] = 0;
    assert_int_equal(reward_remote_score(&c, NULL, with_null, NULL, 1, r, &e), -1);
    assert_non_null(strstr(e.msg, "empty url"));
    snprintf(c.url, sizeof c.url, "ftp://127.0.0.1:1/x");
    assert_int_equal(reward_remote_score(&c, NULL, with_null, NULL, 1, r, &e), -1);
    assert_non_null(strstr(e.msg, "ftp://127.0.0.1:1/x"));
    assert_int_equal(reward_remote_score(NULL, NULL, with_null, NULL, 1, r, &e), -1);
}

int main(void) {
    /* The server is on loopback: a proxy from the environment must not get in between. */
    static const char *const proxies[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"};
    for (size_t i = 0; i < sizeof proxies / sizeof proxies[0]; i++) unsetenv(proxies[i]);
    setenv("no_proxy", "*", 1);
    mill_err e = {{0}};
    if (reward_remote_global_init(&e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_happy_path),     cmocka_unit_test(test_retries_5xx),   cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_404_no_retry),   cmocka_unit_test(test_malformed_json), cmocka_unit_test(test_wrong_length),
        cmocka_unit_test(test_not_a_number),   cmocka_unit_test(test_connection_refused),
        cmocka_unit_test(test_bad_arguments),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    reward_remote_global_cleanup();
    return rc;
}
