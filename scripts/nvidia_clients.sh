#!/usr/bin/env bash
# Runs NVIDIA's own TensorRT-LLM Triton client programs, unmodified, against repositories served by builder.
#
#   CLIENTS=/path/to/TensorRT-LLM/triton_backend bash scripts/nvidia_clients.sh
#
# CLIENTS is a copy of TensorRT-LLM's triton_backend/ (or of the older standalone tensorrtllm_backend checkout):
# it must hold inflight_batcher_llm/client/{end_to_end_grpc_client,inflight_batcher_llm_client}.py and
# tools/inflight_batcher_llm/{end_to_end_test,benchmark_core_model}.py + tools/utils/utils.py. NVIDIA's files are
# not shipped with this project. The script builds two tiny-llama repositories (decoupled, --decoupled-mode false)
# under WORK, serves each in turn with `builder serve` on GRPC_PORT/HTTP_PORT/METRICS_PORT, runs every client
# invocation (each under `timeout 300`) and prints one line per invocation:
#   PASS / FAIL   an invocation that must work
#   XFAIL / XPASS an invocation of a feature builder does not provide (docs/contracts.md) or that Triton itself
#                 refuses in that mode; it is expected to fail, and XPASS flags that it no longer does
# It exits non-zero if any PASS/FAIL invocation failed. The clients' extra packages (pandas, tabulate, tritonclient's
# HTTP side) are pip-installed into WORK/deps when the python lacks them. DATASET overrides the generated
# {input, instruction, output} JSON the CI-style tools read (e.g. NVIDIA's ci/L0_backend_trtllm/simple_data.json).
set -uo pipefail
cd "$(dirname "$0")/.."; ROOT=$PWD
: "${CLIENTS:?set CLIENTS to a copy of the triton_backend directory of TensorRT-LLM}"
PY=${PY:-$PWD/.venv/bin/python}
WORK=${WORK:-/tmp/builder-nvidia-clients}
GRPC_PORT=${GRPC_PORT:-28001}; HTTP_PORT=${HTTP_PORT:-28000}; METRICS_PORT=${METRICS_PORT:-28002}
E2E=$CLIENTS/inflight_batcher_llm/client/end_to_end_grpc_client.py
IBC=$CLIENTS/inflight_batcher_llm/client/inflight_batcher_llm_client.py
E2E_TEST=$CLIENTS/tools/inflight_batcher_llm/end_to_end_test.py
BENCH=$CLIENTS/tools/inflight_batcher_llm/benchmark_core_model.py
for f in "$E2E" "$IBC" "$E2E_TEST" "$BENCH" "$CLIENTS/tools/utils/utils.py"; do
  [ -f "$f" ] || { echo "missing $f" >&2; exit 2; }
done
mkdir -p "$WORK/logs"
export PYTHONPATH="$WORK/deps${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import pandas, tabulate, tritonclient.http, tritonclient.grpc, transformers, torch' 2>/dev/null; then
  echo "installing the clients' packages into $WORK/deps"
  { "$PY" -m pip install -q --target "$WORK/deps" "pandas<2.3" tabulate pytz tzdata --no-deps &&
    "$PY" -m pip install -q --target "$WORK/deps" "geventhttpclient>=2.3.3" "greenlet<3.4.0"; } \
    >"$WORK/logs/pip.log" 2>&1 || { tail "$WORK/logs/pip.log"; exit 2; }
fi
DATA=${DATASET:-$WORK/dataset.json}
[ -n "${DATASET:-}" ] || "$PY" - "$DATA" <<'EOF'
import json, sys
rows = [("The river rose after three days of rain and the town council met to discuss the flood barriers.",
         "The council met about flood barriers after heavy rain."),
        ("A small bakery on the corner started selling bread made with local grain, and the queue now reaches the station.",
         "A bakery selling local-grain bread is very popular."),
        ("Engineers tested a new bridge design using weights and sensors before opening it to traffic in the spring.",
         "A new bridge design was tested before opening."),
        ("Volunteers planted two hundred trees along the old railway line, turning it into a path for walkers.",
         "Volunteers planted trees along a new path.")] * 2
json.dump([{"input": i, "instruction": "Summarize the following news article:", "output": o} for i, o in rows],
          open(sys.argv[1], "w"), indent=1)
EOF

SERVER=; FAILED=0; N=0; T0=$SECONDS
stop_server() { [ -n "$SERVER" ] && { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }; SERVER=; }
trap stop_server EXIT
serve() {  # serve REPO: start builder serve and wait for its ready line
  stop_server; local log=$WORK/logs/serve-$(basename "$1").log
  (cd "$ROOT" && exec "$PY" -m builder.cli serve "$1" --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
    --metrics-port "$METRICS_PORT") >"$log" 2>&1 & SERVER=$!
  for _ in $(seq 300); do
    grep -q '^builder: ready' "$log" && { echo "== serving $1 ($(basename "$1"))"; return 0; }
    kill -0 "$SERVER" 2>/dev/null || break; sleep 1
  done
  echo "FAIL serve $1 (see $log)"; tail -20 "$log"; exit 1
}
# run MODE EXPECT CMD...: EXPECT pass|xfail. A run passes when it exits 0 and printed no server error / FAIL!
# (end_to_end_grpc_client.py prints "Received an error from server" yet exits 0).
run() {
  local mode=$1 expect=$2; shift 2; N=$((N + 1)); local log=$WORK/logs/$N.log ok=1
  timeout 300 "$PY" "$@" >"$log" 2>&1 || ok=0
  grep -q -e 'Received an error from server' -e '^FAIL!' "$log" && ok=0
  local cmd; printf -v cmd '%q ' "$@"; cmd="python ${cmd//$CLIENTS\//}"
  if [ "$expect" = pass ]; then
    if [ $ok = 1 ]; then echo "PASS  [$mode] $cmd"; else echo "FAIL  [$mode] $cmd"; FAILED=$((FAILED + 1)); fi
  else
    if [ $ok = 1 ]; then echo "XPASS [$mode] $cmd"; else echo "XFAIL [$mode] $cmd"; fi
  fi
  [ $ok = 1 ] && [ "$expect" = pass ] || grep -v '^\[[0-9]*\]$' "$log" | tail -3 | sed 's/^/      | /'
  return 0
}
show() { grep -E "$1" "$WORK/logs/$N.log" | head -${2:-3} | sed 's/^/      > /'; }
generated() {  # how many ids inflight_batcher_llm_client.py got after the prompt (its "Output sequence" line)
  "$PY" -c 'import ast, sys
ids = [ast.literal_eval(l.split(":", 1)[1].strip()) for l in open(sys.argv[1]) if l[:9] in ("Input seq", "Output se")]
print(f"      > got {max(len(ids[1]) - len(ids[0]), 0)} of {sys.argv[2]} requested tokens (stopped early)")' "$WORK/logs/$N.log" "$1"
}

cd "$WORK"  # benchmark_core_model / utils write their optional dumps into the current directory
for m in dec unary; do
  flag=true; [ $m = unary ] && flag=false
  (cd "$ROOT" && "$PY" -m builder.cli build --output "$WORK/repo-$m" --force --decoupled-mode $flag) \
    >"$WORK/logs/build-$m.log" 2>&1 || { echo "FAIL build repo-$m"; tail "$WORK/logs/build-$m.log"; exit 1; }
done
G=localhost:$GRPC_PORT; H=localhost:$HTTP_PORT; P="Machine learning is"

serve "$WORK/repo-dec"; TOK=$WORK/repo-dec/preprocessing/1/tokenizer
run decoupled pass "$E2E" -u $G -p "$P" -o 10 --exclude-input-in-output
WHOLE=$(sed -n '/^0: /,$p' "$WORK/logs/$N.log" | sed '1s/^0: //'); show '^0: '
EXP=$("$PY" -c 'import json, sys; print(json.dumps([sys.argv[1]]))' "$WHOLE")
for model in ensemble tensorrt_llm_bls; do  # streamed text == whole text, and the whole text == prompt + it
  run decoupled pass "$E2E" -u $G -p "$P" -o 10 --model-name $model --streaming --check-outputs --expected-outputs "$EXP"
  run decoupled pass "$E2E" -u $G -p "$P" -o 10 --model-name $model --check-outputs --expected-outputs "$EXP"
done
run decoupled pass "$E2E" -u $G --prompt="My name is" --streaming -o=50     # NVIDIA CI (token metrics run)
run decoupled pass "$E2E" -u $G --prompt="My name is"                      # NVIDIA CI (streaming server run)
run decoupled pass "$E2E" -u $G -p "$P" -o 10 --stop-words " m" --bad-words " text" --repetition-penalty 1.1
run decoupled pass "$IBC" -u $G --request-output-len 200 --tokenizer-dir "$TOK" --streaming
show '^Output beam 0'
"$PY" - "$WORK/logs/$N.log" "$WORK/expected_ids.csv" <<'EOF'
import ast, sys
line = next(l for l in open(sys.argv[1]) if l.startswith("Output sequence:"))
open(sys.argv[2], "w").write(",".join(map(str, ast.literal_eval(line.split(":", 1)[1].strip()))) + "\n")
EOF
run decoupled pass "$IBC" -u $G --request-output-len 400 --tokenizer-dir "$TOK" --streaming --stop-after-ms 200 --request-id 1
generated 400
run decoupled pass "$IBC" -u $G --request-output-len 400 --tokenizer-dir "$TOK" --streaming --stop-after-ms 200 --stop-via-request-cancel
generated 400
run decoupled pass "$BENCH" -u $G -i grpc --decoupled --max-input-len 500 dataset --dataset "$DATA" --tokenizer-dir "$TOK"
show 'Total Latency|Requests/Sec|OP tokens/sec|Avg. latency' 4
run decoupled xfail "$E2E" -u $G -o 5 -p '["This is a test","I want you to","The cat is"]' --batch-inputs
run decoupled xfail "$E2E" -u $G -p "$P" -o 10 -n 2
run decoupled xfail "$E2E" -u $G -v --prompt="$P" --return-perf-metrics --streaming
run decoupled xfail "$IBC" -u $G --request-output-len 20 --tokenizer-dir "$TOK"
run decoupled xfail "$BENCH" -u $G -i grpc --decoupled --max-input-len 500 --num-requests 16 token-norm-dist \
  --input-mean 64 --input-stdev 4 --output-mean 16 --output-stdev 2

serve "$WORK/repo-unary"; TOK=$WORK/repo-unary/preprocessing/1/tokenizer
for model in ensemble tensorrt_llm_bls; do
  run unary pass "$E2E" -u $G -p "$P" -o 10 --model-name $model --check-outputs --expected-outputs "$EXP"
done
run unary pass "$IBC" -u $G --request-output-len 200 --tokenizer-dir "$TOK" --check-output --output-tokens-csv "$WORK/expected_ids.csv"
show '^PASS!|^FAIL!'
run unary pass "$IBC" -u $G --request-output-len 400 --tokenizer-dir "$TOK" --stop-after-ms 200 --request-id 1
generated 400
run unary pass "$IBC" -u $G --request-output-len 400 --tokenizer-dir "$TOK" --stop-after-ms 200 --stop-via-request-cancel
generated 400
run unary pass "$E2E_TEST" -u $H --max-input-len=500 --dataset="$DATA"     # NVIDIA CI form (HTTP)
show 'Functionality test|Total Latency' 2
run unary pass "$E2E_TEST" -u $G -i grpc --max-input-len 500 --dataset "$DATA" --test-bls
run unary pass "$E2E_TEST" -u $G -i grpc --max-input-len 500 --dataset "$DATA" --test-bls --model-name tensorrt_llm_bls
run unary pass "$BENCH" -u $H --max-input-len=500 dataset --dataset="$DATA" --tokenizer-dir="$TOK"   # NVIDIA CI form
show 'Total Latency' 1
run unary pass "$BENCH" -u $G -i grpc --max-input-len 500 dataset --dataset "$DATA" --tokenizer-dir "$TOK"
show 'Total Latency|Requests/Sec|OP tokens/sec|Avg. latency' 4
run unary xfail "$E2E" -u $G -p "$P" -o 10 --streaming
run unary xfail "$E2E_TEST" -u $H --max-input-len 500 --dataset "$DATA" --return-log-probs
stop_server
echo "== $FAILED failed; $N invocations in $((SECONDS - T0)) s; logs in $WORK/logs"
[ $FAILED = 0 ]
