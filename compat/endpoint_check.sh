#!/usr/bin/env bash
# `sos audit --endpoint` against a real server: llama-cpp-python's OpenAI-compatible server on
# 127.0.0.1 serves each model in turn, and sos audits it through HTTP, the candidates taken from
# the local copy of the same file. Prints, per model, the behaviour findings and the audit's
# verdict and time.
# Usage: compat/endpoint_check.sh MODEL.gguf [MODEL.gguf ...]   (run from the repository root)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv-server/bin/python ]; then
    python3 -m venv .venv-server
    .venv-server/bin/pip install --quiet --upgrade pip
    # Built for AVX2 rather than -march=native: on a CPU that lists AMX but whose kernel or
    # hypervisor does not grant the tile state, a native build dies on `tilezero` (SIGILL).
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        .venv-server/bin/pip install --quiet --no-binary llama-cpp-python -r requirements-server.txt
fi
cd ..
cargo build --release --quiet -p sos
sos=target/release/sos
port=${SOS_CHECK_PORT:-18089}
for model in "$@"; do
    compat/.venv-server/bin/python -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
        --n_ctx 2048 --n_threads "$(nproc)" > /tmp/sos-endpoint-server.log 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
        sleep 1
    done
    start=$(date +%s.%N)
    set +e
    "$sos" audit "$model" --endpoint "http://127.0.0.1:$port" --format json --out /tmp/sos-endpoint-audit.json
    code=$?
    set -e
    end=$(date +%s.%N)
    kill $server; wait $server 2>/dev/null || true
    python3 - "$model" "$code" "$start" "$end" <<'PY'
import json, sys
model, code, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
r = json.load(open("/tmp/sos-endpoint-audit.json"))
b = r["behavior"]
print(f"{model}: exit {code}, verdict {r['verdict']}, {b['runs']} answers through {b['endpoint']} in {end - start:.0f} s")
print(f"  refusal {b['refusal']['clean']['rate']:.2f}, leak {b['leak']['clean']['rate']:.2f}")
for f in r["findings"]:
    if f["check"] == "behavior":
        print(f"  {f['severity'].upper()} {f['id']}: tokens {f['token_ids']}: {f['title'][:140]}")
PY
done
