#!/usr/bin/env bash
# The GPU check on a CUDA machine: the Triton kernel's tests on CUDA tensors, one layer's decode
# attention timed at 8k/16k/32k tokens, and `python -m smartkv bench --device cuda` for fp16,
# INT4, KIVI-2 and SmartKV at 0.25 (see smartkv/gpu_check.py). Figures go to OUT_DIR/gpu_check.{json,md}.
#
#   scripts/gpu_check.sh OUT_DIR [more arguments for python -m smartkv.gpu_check]
#
# PYTHON (default python3) must have torch with CUDA, triton, transformers and smartkv's other
# dependencies. Without a model that loads there, pass `--model FOLDER` with a folder holding only
# config.json and the tokenizer files (a few MB, made here by `scripts/gpu_check.sh --model-shell
# FOLDER`): the bench then runs the same architecture with random weights. `--parts tests kernel`
# skips the model bench. Exits 2 with one line on a machine without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--model-shell" ]; then
  # copy the default model's config and tokenizer (no weights) into $2, for machines without the model
  dest="${2:?usage: scripts/gpu_check.sh --model-shell FOLDER}"
  src="$("$PY" -c 'from smartkv.models import resolve_model_path; print(resolve_model_path("default"))')"
  mkdir -p "$dest"
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$dest/"; fi
  done
  echo "$dest: $(ls "$dest" | tr '\n' ' ')"
  exit 0
fi
out="${1:?usage: scripts/gpu_check.sh OUT_DIR [--model M] [--contexts N ...] [--parts tests kernel model]}"
shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
exec "$PY" -m smartkv.gpu_check --out "$out" "$@"
