/* common/err.h — error values, logging and the clock timings read.
 * Owns: mill_err (a caller-owned error message buffer), the log functions and mill_now.
 * Convention: a function that can fail returns 0 on success and -1 on failure,
 * after writing one line into the caller's mill_err that names the file, field
 * or peer and what was expected. Nothing here is global. */
#ifndef MILL_ERR_H
#define MILL_ERR_H

#ifdef __cplusplus
extern "C" {
#endif

#include <stdarg.h>

typedef struct {
    char msg[1024];
} mill_err;

/* Seconds on the monotonic clock (CLOCK_MONOTONIC): differences time things; never a date. */
double mill_now(void);

/* Writes the message and returns -1, so `return mill_errf(e, ...)` reads well. */
int mill_errf(mill_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prepends "prefix: " to an existing message (adds context on the way up). */
int mill_err_wrap(mill_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Propagate a failure: `TRY(op(...));` inside a function returning int. */
#define TRY(x)                   \
    do {                         \
        if ((x) != 0) return -1; \
    } while (0)

typedef enum { LOG_DEBUG = 0, LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3 } log_level;
void log_msg(log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#ifdef __cplusplus
}
#endif

#endif
