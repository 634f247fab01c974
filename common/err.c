#include "err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double mill_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int mill_errf(mill_err *e, const char *fmt, ...) {
    if (!e) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int mill_err_wrap(mill_err *e, const char *fmt, ...) {
    if (!e) return -1;
    char prefix[512], old[sizeof e->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof old);
    if (snprintf(e->msg, sizeof e->msg, "%s: %s", prefix, old) >= (int)sizeof e->msg)
        e->msg[sizeof e->msg - 1] = 0; /* a cut message still names the outer context */
    return -1;
}

/* The level threshold comes from MILL_LOG (debug|info|warn|error), read per call:
 * cheap at our log rates and keeps no hidden state. */
void log_msg(log_level lvl, const char *fmt, ...) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    const char *env = getenv("MILL_LOG");
    log_level min = LOG_INFO;
    if (env) {
        for (int i = 0; i < 4; i++)
            if (strcmp(env, names[i]) == 0) min = (log_level)i;
    }
    if (lvl < min) return;
    fprintf(stderr, "[mill %s] ", names[lvl]);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}
