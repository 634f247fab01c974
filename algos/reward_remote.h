/* algos/reward_remote.h — rewards scored by a remote service over HTTP (libcurl + jansson).
 * Owns: the request/reply format, retries with exponential backoff, and the checks on the
 * reply. One POST per batch:
 *   request  {"samples":[{"prompt":"..","response":"..","label":".."}, ...]}
 *   reply    {"rewards":[r0, r1, ...]}   (numbers, as many as samples)
 * Bytes that are not UTF-8 (a byte-level tokenizer can cut a character) are sent as U+FFFD.
 *
 * curl's global state: reward_remote_global_init() runs curl_global_init once; call it from
 * main before threads start, and reward_remote_global_cleanup() at exit. A caller that never
 * does still works — curl_easy_init initialises lazily (thread-safe in libcurl >= 7.84) —
 * so the explicit call is for programs that want the cost and any failure up front. */
#ifndef MILL_REWARD_REMOTE_H
#define MILL_REWARD_REMOTE_H

#include "../common/err.h"

typedef struct {
    char url[512];    /* e.g. "http://127.0.0.1:8000/score" */
    double timeout_s; /* per attempt, connecting included; <= 0 means 30 s */
    int retries;      /* extra attempts after the first (< 0 counts as 0) */
    double backoff_s; /* sleep before retry k (k = 0, 1, ...): backoff_s * 2^k */
} remote_reward_config;

/* 0, or -1 with the reason in e. */
int reward_remote_global_init(mill_err *e);
/* 1 when a libcurl result (CURLcode) is worth another attempt: connection, timeout, a dropped
 * transfer; the hub downloads (launch/hub.c) retry on the same. */
int reward_remote_transient(int curl_code);
void reward_remote_global_cleanup(void);

/* Scores n samples in one request; rewards[i] for sample i. prompts and labels may be NULL
 * (sent as JSON null); responses may not. Retries connection errors, timeouts, empty replies
 * and HTTP 5xx; an HTTP 4xx (or other non-2xx), a reply that is not JSON, not
 * {"rewards":[...]}, of another length, or with a non-numeric or non-finite reward fails at
 * once. Errors name the URL and what was expected. n == 0 sends nothing and returns 0. */
int reward_remote_score(const remote_reward_config *c, const char *const *prompts, const char *const *responses,
                        const char *const *labels, int n, float *rewards, mill_err *e);

#endif
