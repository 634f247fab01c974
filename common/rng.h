/* common/rng.h — the project's random numbers: xoshiro256** seeded by splitmix64.
 * Owns: rng (plain state, saved in checkpoints for bit-identical resume). */
#ifndef MILL_RNG_H
#define MILL_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} rng;

void rng_seed(rng *r, uint64_t seed);
uint64_t rng_next(rng *r);
/* Uniform in [0, n) without modulo bias; n > 0. */
uint64_t rng_below(rng *r, uint64_t n);
/* Uniform float in [0, 1). */
float rng_uniform(rng *r);
/* Standard normal (Box-Muller). */
float rng_normal(rng *r);

#endif
