/* launch/recipe.h — recipe sections shared by the SFT and GRPO drivers (YAML via common/yamlcfg). */
#ifndef MILL_RECIPE_H
#define MILL_RECIPE_H

#include <jansson.h>

#include "../trainer/optimizer.h"
#include "../trainer/parallel.h"

extern const char *const recipe_optimizer_keys[]; /* the keys of the "optimizer" section */

/* The "optimizer" section into o; o's current values are the defaults. total_steps is the caller's. */
int recipe_optimizer(json_t *y, const char *path, optim_config *o, mill_err *e);
/* The "data" section: kind (only "arithmetic" so far), levels (a list of 1 to 4 levels, default [1])
 * and seed (default 1). */
int recipe_data(json_t *y, const char *path, int *levels, int *n_levels, uint64_t *seed, mill_err *e);
/* data.levels alone: a list of 1 to 4 arithmetic levels (default [1]). */
int recipe_levels(json_t *y, const char *path, int *levels, int *n_levels, mill_err *e);

/* train.parallel {tp, pp, ep, cp, dp} (each a size, default 1) into s. */
int recipe_parallel(json_t *y, const char *path, par_sizes *s, mill_err *e);

#endif
