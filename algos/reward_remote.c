/* algos/reward_remote.c — the HTTP reward client. See reward_remote.h for the contract.
 * One curl easy handle per call, kept across its retries so a live connection is reused. */
#include "reward_remote.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { RR_MAX_REPLY = 64 << 20 }; /* a reply this big is a wrong URL, not rewards */

int reward_remote_global_init(mill_err *e) {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) return mill_errf(e, "reward_remote: curl_global_init: %s", curl_easy_strerror(rc));
    return 0;
}

void reward_remote_global_cleanup(void) { curl_global_cleanup(); }

/* ---- the request ---- */

/* Length of the valid UTF-8 sequence at s, or 0 (RFC 3629: no overlongs, no surrogates). */
static size_t rr_utf8_len(const unsigned char *s) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t k;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        k = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        k = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (s[1] < lo || s[1] > hi) return 0; /* also stops at the NUL */
    for (size_t j = 2; j < k; j++)
        if (s[j] < 0x80 || s[j] > 0xBF) return 0;
    return k;
}

/* A JSON string of s with each invalid byte as U+FFFD (jansson refuses invalid UTF-8);
 * JSON null for NULL; NULL when out of memory. */
static json_t *rr_json_text(const char *s) {
    if (!s) return json_null();
    size_t n = strlen(s);
    if (n > (SIZE_MAX - 1) / 3) return NULL;
    char *t = malloc(3 * n + 1);
    if (!t) return NULL;
    size_t w = 0;
    for (size_t i = 0; i < n;) {
        size_t k = rr_utf8_len((const unsigned char *)s + i);
        if (k) {
            memcpy(t + w, s + i, k);
            w += k;
            i += k;
        } else {
            memcpy(t + w, "\xEF\xBF\xBD", 3);
            w += 3;
            i++;
        }
    }
    json_t *j = json_stringn(t, w);
    free(t);
    return j;
}

static char *rr_request_body(const char *const *prompts, const char *const *responses, const char *const *labels,
                             int n) {
    json_t *root = json_object(), *arr = json_array();
    char *body = NULL;
    if (!root || !arr || json_object_set(root, "samples", arr)) goto done;
    for (int i = 0; i < n; i++) {
        json_t *o = json_object();
        if (!o || json_array_append_new(arr, o)) goto done;
        if (json_object_set_new(o, "prompt", rr_json_text(prompts ? prompts[i] : NULL)) ||
            json_object_set_new(o, "response", rr_json_text(responses[i])) ||
            json_object_set_new(o, "label", rr_json_text(labels ? labels[i] : NULL)))
            goto done;
    }
    body = json_dumps(root, JSON_COMPACT);
done:
    json_decref(arr);
    json_decref(root);
    return body;
}

/* ---- the reply ---- */

typedef struct {
    char *p;
    size_t n, cap;
    int too_big;
} rr_buf;

static size_t rr_write(char *data, size_t size, size_t nmemb, void *ud) {
    rr_buf *b = ud;
    size_t k = size * nmemb;
    if (k > RR_MAX_REPLY - b->n) {
        b->too_big = 1;
        return 0; /* a short count makes curl stop with CURLE_WRITE_ERROR */
    }
    if (b->n + k + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + k + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return 0;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, k);
    b->n += k;
    b->p[b->n] = 0;
    return k;
}

/* The first bytes of a reply, printable, for error messages. */
static void rr_snippet(const rr_buf *b, char *out, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < b->n && k + 4 < cap; i++) {
        unsigned char c = (unsigned char)b->p[i];
        out[k++] = c >= 0x20 && c < 0x7F ? (char)c : '?';
    }
    if (b->n > k && k + 4 <= cap) {
        memcpy(out + k, "...", 3);
        k += 3;
    }
    out[k] = 0;
}

static int rr_parse(const remote_reward_config *c, const rr_buf *b, int n, float *rewards, mill_err *e) {
    char snip[160];
    rr_snippet(b, snip, sizeof snip);
    json_error_t je;
    json_t *root = json_loadb(b->p ? b->p : "", b->n, 0, &je);
    if (!root)
        return mill_errf(e, "reward_remote: %s: reply is not JSON (%s, line %d column %d); expected {\"rewards\":[%d numbers]}, got \"%s\"",
                         c->url, je.text, je.line, je.column, n, snip);
    json_t *arr = json_is_object(root) ? json_object_get(root, "rewards") : NULL;
    int rc = 0;
    if (!json_is_array(arr)) {
        rc = mill_errf(e, "reward_remote: %s: reply has no \"rewards\" array; expected {\"rewards\":[%d numbers]}, got \"%s\"", c->url,
                       n, snip);
    } else if (json_array_size(arr) != (size_t)n) {
        rc = mill_errf(e, "reward_remote: %s: reply has %zu rewards; expected one per sample, %d", c->url, json_array_size(arr), n);
    } else {
        for (int i = 0; i < n && rc == 0; i++) {
            json_t *v = json_array_get(arr, (size_t)i);
            /* finite as the float it becomes: 1e300 is a finite double but an infinite reward */
            if (!json_is_number(v) || !(fabs(json_number_value(v)) <= FLT_MAX))
                rc = mill_errf(e, "reward_remote: %s: reward %d is not a finite number; expected {\"rewards\":[%d numbers]}", c->url, i, n);
        }
        for (int i = 0; i < n && rc == 0; i++) rewards[i] = (float)json_number_value(json_array_get(arr, (size_t)i));
    }
    json_decref(root);
    return rc;
}

/* ---- the call ---- */

/* Failures worth another attempt: the service may be restarting, overloaded or slow, or the
 * network dropped (HTTP/2 stream resets included). */
int reward_remote_transient(int curl_code) {
    switch ((CURLcode)curl_code) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return 1;
    default:
        return 0;
    }
}

static void rr_sleep(double s) {
    if (!(s > 0)) return;
    if (s > 3600) s = 3600;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

int reward_remote_score(const remote_reward_config *c, const char *const *prompts, const char *const *responses,
                        const char *const *labels, int n, float *rewards, mill_err *e) {
    if (!c) return mill_errf(e, "reward_remote: no config");
    if (strnlen(c->url, sizeof c->url) == sizeof c->url) return mill_errf(e, "reward_remote: url is not NUL-terminated");
    if (!c->url[0]) return mill_errf(e, "reward_remote: empty url; expected e.g. http://host:port/score");
    if (n < 0) return mill_errf(e, "reward_remote: %s: %d samples", c->url, n);
    if (n == 0) return 0;
    if (!responses || !rewards) return mill_errf(e, "reward_remote: %s: responses and rewards must not be NULL", c->url);
    for (int i = 0; i < n; i++)
        if (!responses[i]) return mill_errf(e, "reward_remote: %s: response %d is NULL", c->url, i);

    char *body = rr_request_body(prompts, responses, labels, n);
    if (!body) return mill_errf(e, "reward_remote: %s: out of memory building the request", c->url);
    CURL *h = curl_easy_init();
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
    struct curl_slist *hdr2 = hdr ? curl_slist_append(hdr, "Expect:") : NULL; /* no 100-continue wait */
    if (!h || !hdr2) {
        curl_slist_free_all(hdr);
        curl_easy_cleanup(h);
        free(body);
        return mill_errf(e, "reward_remote: %s: curl_easy_init failed", c->url);
    }
    hdr = hdr2;
    double timeout = c->timeout_s > 0 ? c->timeout_s : 30.0;
    long timeout_ms = timeout * 1000 < 1 ? 1 : timeout * 1000 > 86400000 ? 86400000 : (long)(timeout * 1000);
    char errbuf[CURL_ERROR_SIZE];
    rr_buf reply = {0};
    curl_easy_setopt(h, CURLOPT_URL, c->url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "mill-reward/1");
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* timeouts without SIGALRM: safe in threads */
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, rr_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &reply);

    int retries = c->retries > 0 ? c->retries : 0, rc = -1;
    char last[512] = "";
    for (int attempt = 0; attempt <= retries; attempt++) {
        if (attempt) rr_sleep(ldexp(c->backoff_s, attempt - 1 > 30 ? 30 : attempt - 1));
        reply.n = 0;
        reply.too_big = 0;
        errbuf[0] = 0;
        CURLcode cc = curl_easy_perform(h);
        long status = 0;
        if (cc == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        if (cc == CURLE_OK && status >= 200 && status < 300) {
            rc = rr_parse(c, &reply, n, rewards, e);
            goto done;
        }
        if (cc == CURLE_OK) {
            char snip[160];
            rr_snippet(&reply, snip, sizeof snip);
            snprintf(last, sizeof last, "HTTP %ld \"%s\"", status, snip);
            if (status >= 500 && status < 600) continue;
            mill_errf(e, "reward_remote: %s: HTTP %ld \"%s\"; expected 200 with {\"rewards\":[%d numbers]}", c->url, status, snip, n);
            goto done;
        }
        if (reply.too_big) {
            mill_errf(e, "reward_remote: %s: reply over %d MiB; expected {\"rewards\":[%d numbers]}", c->url, RR_MAX_REPLY >> 20, n);
            goto done;
        }
        snprintf(last, sizeof last, "%s", errbuf[0] ? errbuf : curl_easy_strerror(cc)); /* errbuf says more */
        if (!reward_remote_transient(cc)) {
            mill_errf(e, "reward_remote: %s: %s", c->url, last);
            goto done;
        }
    }
    mill_errf(e, "reward_remote: %s: gave up after %d attempt%s (timeout %.3g s each); last: %s", c->url, retries + 1,
              retries ? "s" : "", timeout, last);
done:
    free(reply.p);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(h);
    free(body);
    return rc;
}
