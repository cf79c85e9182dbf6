#!/usr/bin/env bash
# sos against its peers, in the same run, on the same model and thread count.
#
#   bench/run.sh            # both benchmarks
#   bench/run.sh generate   # decode speed: sos (quant and f32) vs llama.cpp (llama-cpp-python)
#   bench/run.sh step       # attack step:  sos (f32) vs PyTorch + transformers
#   bench/run.sh attack     # time for the default backdoor to reach train metric 1.0: sos vs PyTorch
#
# Environment: THREADS (default 2), REPEAT (default 5 rounds; each round measures sos and the
# peer back to back, sos first in odd rounds and the peer first in even ones, so that a drift of
# the machine's speed does not always favour the same side; the summary gives medians and the
# median of the per-round ratios), PYTHON (default: the venv bench/.venv, created on first use
# with the pinned peers of bench/requirements.txt), RESULTS (default bench/results/latest),
# SKIP_INSTALL=1 (do not pip install missing peers), SKIP_BUILD=1, BENCH_MAX_OTHER_CORES /
# BENCH_WAIT_QUIET (see measure.py), MODEL (a model-cache alias such as
# qwen2.5-coder-0.5b-instruct; default: the default model), SOS (a sos binary to measure instead
# of building this checkout's), SKIP_F32=1 (generate: leave out the `--exec f32` row, which takes
# minutes on the larger models), SOS_STEP_ARGS (more flags for `sos bench step`, such as
# `--low-memory`). Prints a table and, last, one JSON line with the ratios.
set -euo pipefail

MODE="${1:-all}"
case "$MODE" in all | generate | step | attack) ;; *) echo "usage: $0 [all|generate|step|attack]" >&2; exit 2 ;; esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
THREADS="${THREADS:-2}"
REPEAT="${REPEAT:-5}"
RESULTS="${RESULTS:-$HERE/results/latest}"
if [[ -n "${SOS:-}" ]]; then SKIP_BUILD=1; else SOS="$ROOT/target/release/sos"; fi
if [[ -z "${PYTHON:-}" ]]; then
  # The peers live in a venv of their own, pinned, so that a run measures the same versions.
  if [[ ! -x "$HERE/.venv/bin/python" ]]; then python3 -m venv "$HERE/.venv"; fi
  PYTHON="$HERE/.venv/bin/python"
fi
PY="$PYTHON"

# Generation shape (matches the defaults of `sos bench generate`).
PROMPT_TOKENS=100 NEW_TOKENS=128 GEN_RUNS=3
# Step shape (matches the defaults of `sos bench step`).
BATCH=8 SEQ=64 SOFT=8 TARGETS=16 STEP_RUNS=5

log() { echo "[bench] $*" >&2; }

# --- peers ------------------------------------------------------------------------------------
pip_busy_with() { pgrep -f "pip install.*${1%%[=<>]*}" >/dev/null 2>&1; }

# The pinned version of a package in bench/requirements.txt.
pin() { grep -E "^$1==" "$HERE/requirements.txt" || { log "no pin for $1 in bench/requirements.txt"; exit 1; }; }

ensure_pkg() { # ensure_pkg <import name> <package>
  local mod="$1"; shift
  set -- "$(pin "$1")"
  if "$PY" -c "import $mod" >/dev/null 2>&1; then return 0; fi
  # A build of this package may already be running (llama-cpp-python compiles for 15-30 min).
  while pip_busy_with "$1"; do
    log "waiting for a running 'pip install $1' to finish..."
    sleep 30
  done
  if "$PY" -c "import $mod" >/dev/null 2>&1; then return 0; fi
  if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then log "missing python module '$mod' (SKIP_INSTALL=1)"; exit 1; fi
  log "pip install $*"
  "$PY" -m pip install "$@" >&2
}

if [[ "$MODE" == all || "$MODE" == generate ]]; then
  ensure_pkg numpy numpy
  ensure_pkg llama_cpp llama-cpp-python
fi
if [[ "$MODE" != generate ]]; then  # step, attack, all
  ensure_pkg torch torch
  ensure_pkg transformers transformers
  ensure_pkg gguf gguf
  ensure_pkg accelerate accelerate # transformers needs it to load a GGUF
fi

# --- sos --------------------------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  for i in 1 2 3 4 5; do
    if (cd "$ROOT" && cargo build --release -p sos >&2); then break; fi
    if [[ $i == 5 ]]; then log "cargo build failed 5 times"; exit 1; fi
    log "cargo build failed (someone may be mid-edit); retrying in 60 s"
    sleep 60
  done
fi
[[ -x "$SOS" ]] || { log "no $SOS"; exit 1; }
# Measure a snapshot: someone may rebuild target/release/sos while this runs.
mkdir -p "$RESULTS"
rm -rf "$RESULTS"/r[0-9]* "$RESULTS"/*.json "$RESULTS"/prompt_ids.json
cp "$SOS" "$RESULTS/sos.bin"
SOS="$RESULTS/sos.bin"
MODEL="$("$SOS" model fetch ${MODEL:+"$MODEL"} | tail -n 1)"
[[ -f "$MODEL" ]] || { log "sos model fetch did not print a file: $MODEL"; exit 1; }
log "model: $MODEL"

# Every engine gets the same number of threads.
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
M=("$PY" "$HERE/measure.py")

"$PY" - "$RESULTS/meta.json" "$THREADS" "$MODEL" "$ROOT" "$SOS" <<'EOF'
import hashlib, json, os, platform, subprocess, sys, datetime
out, threads, model, root, sos = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()
rev = git("rev-parse", "--short", "HEAD")
dirty = bool(git("status", "--porcelain", "--", "crates", "Cargo.toml", "Cargo.lock"))
json.dump({"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "threads": int(threads),
           "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "model": model,
           "sos_git": rev, "sos_git_dirty": dirty,
           "sos_sha256": hashlib.sha256(open(sos, "rb").read()).hexdigest()[:16]}, open(out, "w"))
EOF

# One measurement of each side; a round runs both, in an order that alternates from round to round.
sos_generate() {
  log "[$r/$REPEAT] sos bench generate --exec quant"
  "${M[@]}" --out "$D/sos_generate_quant.json" -- "$SOS" bench generate -m "$MODEL" --exec quant \
    --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --runs "$GEN_RUNS" --json
}
peer_generate() {
  log "[$r/$REPEAT] llama.cpp generate (same prompt ids as sos)"
  "${M[@]}" --out "$D/llamacpp_generate.json" -- "$PY" "$HERE/llamacpp_generate.py" --model "$MODEL" \
    --prompt-ids "$IDS" --new-tokens "$NEW_TOKENS" --threads "$THREADS" --runs "$GEN_RUNS"
}
sos_step() {
  log "[$r/$REPEAT] sos bench step"
  "${M[@]}" --out "$D/sos_step.json" -- "$SOS" bench step -m "$MODEL" --batch "$BATCH" --seq "$SEQ" \
    --soft "$SOFT" --targets "$TARGETS" --runs "$STEP_RUNS" ${SOS_STEP_ARGS:-} --json
}
peer_step() {
  log "[$r/$REPEAT] torch step (loading the GGUF through transformers takes a while; not timed)"
  "${M[@]}" --out "$D/torch_step.json" -- "$PY" "$HERE/torch_step.py" --model "$MODEL" --batch "$BATCH" \
    --seq "$SEQ" --soft "$SOFT" --targets "$TARGETS" --runs "$STEP_RUNS" --threads "$THREADS"
}
sos_attack() {
  log "[$r/$REPEAT] sos bench attack (default backdoor until train metric 1.0; a few minutes)"
  "${M[@]}" --out "$D/sos_attack.json" -- "$SOS" bench attack -m "$MODEL" --export "$D/problem.json" --json
}
peer_attack() {
  log "[$r/$REPEAT] torch attack (same problem: ids, starting trigger, batches, settings)"
  "${M[@]}" --out "$D/torch_attack.json" -- "$PY" "$HERE/torch_attack.py" --problem "$D/problem.json" \
    --model "$MODEL" --threads "$THREADS"
}
pair() { # pair <name>: both sides of one benchmark, sos first in odd rounds
  if ((r % 2 == 1)); then "sos_$1"; "peer_$1"; else "peer_$1"; "sos_$1"; fi
}

# The peer decodes the prompt ids sos used; the first round's, so that a peer going first has them.
IDS="$RESULTS/prompt_ids.json"
for ((r = 1; r <= REPEAT; r++)); do
  D="$RESULTS/r$r"
  mkdir -p "$D"
  if [[ "$MODE" == all || "$MODE" == generate ]]; then
    if [[ ! -f "$IDS" ]]; then
      "$SOS" bench generate -m "$MODEL" --exec quant --prompt-tokens "$PROMPT_TOKENS" --new-tokens 2 --runs 1 --json | tail -n 1 > "$IDS"
    fi
    pair generate
    if [[ "${SKIP_F32:-0}" != 1 ]]; then
      log "[$r/$REPEAT] sos bench generate --exec f32"
      "${M[@]}" --out "$D/sos_generate_f32.json" -- "$SOS" bench generate -m "$MODEL" --exec f32 \
        --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --runs "$GEN_RUNS" --json
    fi
  fi
  if [[ "$MODE" == all || "$MODE" == step ]]; then pair step; fi
  # The peer replays the problem sos exported, so sos always goes first here.
  if [[ "$MODE" == all || "$MODE" == attack ]]; then sos_attack; peer_attack; fi
done

echo
"$PY" "$HERE/summarize.py" "$RESULTS"
