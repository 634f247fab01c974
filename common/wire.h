/* common/wire.h — mill's wire protocol: msgpack headers plus raw data frames over ZeroMQ.
 * Owns: message encoding and the validating decoder.
 *
 * A message is one ZeroMQ multipart message: [header, data_0, ..., data_{n-1}] (a ROUTER socket
 * adds the peer identity frame in front). The header is a msgpack map with string keys:
 *   "type": string (e.g. "generate"), "v": protocol version (integer, WIRE_VERSION),
 *   "id": request id (unsigned integer), any message-specific fields, and
 *   "frames": array of {"name": string, "dtype": safetensors dtype string, "shape": [ints]}, one
 *   entry per data frame, in order. Bulk data (tokens, logprobs, routing, weights) always travels
 *   in data frames, never as msgpack arrays of numbers.
 * The decoder checks every type, size and bound before use: a hostile or truncated message is an
 * error naming the field, never a crash. */
#ifndef MILL_WIRE_H
#define MILL_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "tensor.h"

#define WIRE_VERSION 1
#define WIRE_MAX_FRAMES 64
#define WIRE_MAX_HEADER (1 << 20)

typedef struct {
    char name[128];
    mill_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    const void *data; /* points into the received frame: valid while the message lives */
    size_t nbytes;
} wire_frame;

typedef struct wire_msg wire_msg; /* a decoded message (opaque) */

/* Decodes a header and its data frames (n_frames of them). On success *out owns the parsed
 * header; data pointers refer to the caller's frame buffers. */
int wire_decode(wire_msg **out, const void *header, size_t header_len, const void *const *frames,
                const size_t *frame_lens, int n_frames, mill_err *e);
void wire_msg_free(wire_msg *m);

const char *wire_type(const wire_msg *m);
uint64_t wire_id(const wire_msg *m);
int wire_n_frames(const wire_msg *m);
const wire_frame *wire_frame_at(const wire_msg *m, int i);
/* The frame with this name, or NULL. */
const wire_frame *wire_frame_named(const wire_msg *m, const char *name);

/* Typed header fields. Absent optional fields take the default; a present field of the wrong
 * type or out of range is an error naming it. */
int wire_get_int(const wire_msg *m, const char *key, int required, int64_t def, int64_t lo, int64_t hi, int64_t *out,
                 mill_err *e);
int wire_get_num(const wire_msg *m, const char *key, int required, double def, double lo, double hi, double *out,
                 mill_err *e);
int wire_get_bool(const wire_msg *m, const char *key, int required, int def, int *out, mill_err *e);
/* Copies a string field into buf (cap bytes, NUL-terminated); longer strings are an error. */
int wire_get_str(const wire_msg *m, const char *key, int required, const char *def, char *buf, size_t cap,
                 mill_err *e);
/* An array of integers in [lo, hi], at most cap of them. */
int wire_get_int_array(const wire_msg *m, const char *key, int required, int64_t lo, int64_t hi, int64_t *out, int cap,
                       int *n, mill_err *e);

/* Encoding: fields and frames are collected, then packed. Frame data is referenced, not copied:
 * it must stay valid until wire_builder_free. */
typedef struct wire_builder wire_builder;

wire_builder *wire_builder_new(const char *type, uint64_t id);
void wire_put_int(wire_builder *b, const char *key, int64_t v);
void wire_put_num(wire_builder *b, const char *key, double v);
#define WIRE_MAX_INTS 64
/* A short array of integers (at most WIRE_MAX_INTS, copied), e.g. stop token ids. */
void wire_put_int_array(wire_builder *b, const char *key, const int64_t *v, int n);
void wire_put_bool(wire_builder *b, const char *key, int v);
void wire_put_str(wire_builder *b, const char *key, const char *v);
int wire_put_frame(wire_builder *b, const char *name, mill_dtype dt, int ndim, const int64_t *shape, const void *data,
                   mill_err *e);
/* The packed header (valid until wire_builder_free) and the data frames to send after it. */
int wire_builder_pack(wire_builder *b, const void **header, size_t *header_len, mill_err *e);
int wire_builder_n_frames(const wire_builder *b);
void wire_builder_frame(const wire_builder *b, int i, const void **data, size_t *len);
void wire_builder_free(wire_builder *b);

/* ZeroMQ helpers. identity: the ROUTER peer frame (NULL/0 on DEALER/REQ sockets). */
int wire_send(void *sock, const void *identity, size_t identity_len, wire_builder *b, mill_err *e);
/* Receives one multipart message and decodes it. *raw keeps the frames alive (wire_recv_free).
 * Returns 0, or -1 with e set (the message was consumed; reply with an error), or 1 when no
 * message arrived within timeout_ms (-1 blocks). identity (cap 256) gets the peer frame on ROUTER;
 * there a header that arrived whole but does not decode leaves its frames in *raw too (-1), so the
 * error reply can carry its request id (wire_raw_id); free them either way. */
typedef struct wire_raw wire_raw;
int wire_recv(void *sock, int is_router, int timeout_ms, unsigned char *identity, size_t *identity_len, wire_msg **msg,
              wire_raw **raw, mill_err *e);
void wire_recv_free(wire_raw *raw);
/* The parts of a received message after the ROUTER identity (is_router): header, then data frames
 * (at most cap; returns how many), to hand the same bytes to wire_decode elsewhere. */
int wire_raw_parts(const wire_raw *raw, int is_router, const void **data, size_t *lens, int cap);
/* The request id of a header wire_decode refused (a wrong version, a missing type, a bad frame...),
 * when it holds a well-formed unsigned "id": so the error reply names the request it answers.
 * Returns 0 otherwise (the id of no request). */
uint64_t wire_peek_id(const void *header, size_t header_len);
/* The same for a received message's header (wire_recv's raw). */
uint64_t wire_raw_id(const wire_raw *raw, int is_router);

/* CURVE (ZeroMQ's elliptic-curve encryption) for a run's sockets: every binding socket (trainer
 * worker, rollout engines) uses the run's server keypair, every connecting socket the client
 * keypair and the server's public key. A binding process also runs a ZAP handler (wire_zap) that
 * admits only the run's client key, so a peer without the run's key file can neither read the
 * traffic nor connect. Keys are Z85 text. */
typedef struct {
    int on;
    char server_public[41], server_secret[41], client_public[41], client_secret[41];
} wire_curve;

/* Fresh keys (fails when this libzmq was built without CURVE). */
int wire_curve_new(wire_curve *c, mill_err *e);
/* The key file: four lines (server public, server secret, client public, client secret); written
 * with mode 0600, read back with every line checked. */
int wire_curve_save(const wire_curve *c, const char *path, mill_err *e);
int wire_curve_load(wire_curve *c, const char *path, mill_err *e);
/* Before zmq_bind / zmq_connect; no-ops when c is NULL or off. */
int wire_curve_server(void *sock, const wire_curve *c, mill_err *e);
int wire_curve_client(void *sock, const wire_curve *c, mill_err *e);

/* The ZAP handler of a ZeroMQ context (a thread answering inproc://zeromq.zap.01): CURVE clients
 * with c's client key are admitted, every other one refused. Start it before binding a CURVE
 * server socket in zctx; stop it before zmq_ctx_term (it shuts the context down). No-op (*out
 * NULL) when c is NULL or off. */
typedef struct wire_zap wire_zap;
int wire_zap_start(void *zctx, const wire_curve *c, wire_zap **out, mill_err *e);
void wire_zap_stop(wire_zap *z);

#endif
