/* launch/reward_cli.h — `mill reward`: a dataset and a reward checked before a run.
 *   mill reward --input IN.jsonl --output OUT.jsonl [--remote URL] [--timeout S]
 * Each input line is {"response": "...", "label": "..." (or a number), "prompt": "..." (optional)};
 * each output line, in order, is {"reward": 0 or 1, "extracted": "..." (the final answer the
 * verifier found, "" when none)}. By default the math verifier (algos/verify.h) scores; --remote
 * sends the whole file to an HTTP scorer (algos/reward_remote.h) in batches instead (its rewards,
 * any number; "extracted" still the verifier's). A summary goes to stdout. Takes main's argc/argv
 * and returns the exit status: 0, or 1 after one line "mill reward: error: ..." on stderr naming
 * the file and line at fault. */
#ifndef MILL_REWARD_CLI_H
#define MILL_REWARD_CLI_H

int cli_reward(int argc, char **argv);

#endif
