/* launch/download_cli.h — `mill download`: a Hugging Face hub repository's files into a directory.
 *   mill download REPO_ID --out DIR [--revision R] [--include GLOB]... [--repo-type model|dataset]
 *                 [--timeout S] [--retries N] [--verify]
 * Lists the repository at R (default main) and fetches every file (or those matching a --include
 * glob) through hub.h: resumed, retried, size- and hash-checked, renamed into place; files already
 * present and right are left alone, so a second run fetches nothing. The hub is $HF_ENDPOINT
 * (default https://huggingface.co), the token $HF_TOKEN (or huggingface_hub's token file); the
 * stall timeout $HF_HUB_DOWNLOAD_TIMEOUT or --timeout (10 s). A line per file and a summary go to
 * stdout; a progress bar to stderr when it is a terminal. Takes main's argc/argv and returns the
 * exit status: 0, or 1 after one line "mill download: error: ..." on stderr. */
#ifndef MILL_DOWNLOAD_CLI_H
#define MILL_DOWNLOAD_CLI_H

int cli_download(int argc, char **argv);

#endif
