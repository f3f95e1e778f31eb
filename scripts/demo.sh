#!/usr/bin/env bash
# The main job on the built-in tiny model: build -> serve (real tritonserver) -> streamed text over gRPC.
# Usage: scripts/demo.sh ["prompt"]   (ports: BUILDER_GRPC_PORT/HTTP_PORT/METRICS_PORT, default 8001/8000/8002)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/install.sh")
export PATH="$venv/bin:$PATH"
repo=${BUILDER_DEMO_REPO:-$root/out/tiny-llama-repo}
grpc=${BUILDER_GRPC_PORT:-8001}; http=${BUILDER_HTTP_PORT:-8000}; metrics=${BUILDER_METRICS_PORT:-8002}
prompt=${1:-"The GPU server streams tokens"}
log=$(dirname "$repo")/serve.log
mkdir -p "$(dirname "$repo")"

builder build --model tiny-llama --output "$repo" --force
builder serve "$repo" --grpc-port "$grpc" --http-port "$http" --metrics-port "$metrics" > "$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  grep -q "^builder: ready" "$log" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
cat "$log"
echo "--- streamed text (tiny-llama has random weights, so the words are random) ---"
builder generate --url "localhost:$grpc" --stream --max-tokens 48 "$prompt"
