#!/usr/bin/env bash
# Regenerates the script reference in README.md from the registry (`ganpo-run --help-markdown`).
set -euo pipefail
cd "$(dirname "$0")/.."
reference=$(mktemp)
trap 'rm -f "$reference"' EXIT
cargo run -q --bin ganpo-run -- --help-markdown > "$reference"
python3 - "$reference" <<'PY'
import sys
reference = open(sys.argv[1]).read()
readme = open("README.md").read()
start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
head, rest = readme.split(start, 1)
_, tail = rest.split(end, 1)
open("README.md", "w").write(head + start + reference + end + tail)
PY
