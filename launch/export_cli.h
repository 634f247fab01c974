/* launch/export_cli.h — `mill export`: a model or training checkpoint in HF transformers' layout.
 *   mill export --model DIR --out HFDIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--force]
 * DIR: a model directory (release names, single or sharded) or a training checkpoint; HFDIR gets
 * what DeepseekV4ForCausalLM.from_pretrained reads with no renaming (trainer/export.h). Takes main's
 * argc/argv and returns the exit status: 0, or 1 after one line "mill export: error: ..." on stderr. */
#ifndef MILL_EXPORT_CLI_H
#define MILL_EXPORT_CLI_H

int cli_export(int argc, char **argv);

#endif
