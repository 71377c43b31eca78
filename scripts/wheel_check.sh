#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it with the demo extra into a fresh
# virtual environment, and from an empty directory, offline, train the demo for one epoch and
# answer jsonl questions from standard input with the model it wrote.
#   scripts/wheel_check.sh            (make wheel-check; CI runs it after make test)
# PYTHON picks the interpreter (python3), TORCH the torch requirement installed first (the CPU
# build; a bare `torch` may pull a multi-GB CUDA build), KEEP=1 keeps the work directory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qa-wheel-check.XXXXXX")
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
unset PYTHONPATH  # nothing of the checkout on the path: the installed package must answer
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
step() { echo "wheel-check [$((SECONDS - start)) s] $*"; }

step "virtual environment in $WORK/venv; $TORCH"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q "$TORCH"

step "pip wheel --no-deps -w dist ."
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/qa_lightning-*.whl)
step "pip install $(basename "$WHEEL")[demo]"
"$PY" -m pip install -q "$WHEEL[demo]"

mkdir "$WORK/empty" && cd "$WORK/empty"
"$PY" - "$WORK/venv" <<'PY'
import sys
import qa_lightning
assert qa_lightning.__file__.startswith(sys.argv[1]), qa_lightning.__file__
PY

step "python -m qa_lightning.train experiment=demo trainer.max_epochs=1 (from an empty directory)"
"$PY" -m qa_lightning.train experiment=demo trainer.max_epochs=1 hydra.run.dir=run \
  callbacks.progress_bar.refresh_rate=0
test -f run/metrics.json && test -f run/hf_model/model.safetensors

step "jsonl on standard input | python -m qa_lightning.predict model_dir=run/hf_model input=-"
printf '%s\n' \
  '{"id": "q1", "question": "Who wrote the report?", "context": "The report was written by the committee in 1998."}' \
  '{"id": "q2", "question": "broken line' \
  | "$PY" -m qa_lightning.predict model_dir=run/hf_model input=- progress=false >answers.jsonl
"$PY" - <<'PY'
import json
rows = [json.loads(line) for line in open("answers.jsonl", encoding="utf-8")]
assert [row["line"] for row in rows] == [1, 2], rows
answer = rows[0]["answers"][0]
context = "The report was written by the committee in 1998."
assert context[answer["start"] : answer["end"]] == answer["answer"], answer
assert "error" in rows[1], rows[1]
print("answers.jsonl:", *rows, sep="\n  ")
PY
step "passed"
