#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, one stage per argument, results under OUT (default ./gpu-results).
#
#   scripts/bench_gpu.sh tests offline       # GPU tests + engine-alone sweeps (Llama-3-8B shape, random bf16)
#   scripts/bench_gpu.sh batch1              # batch-1 decode bf16 / int8_wo / int4_awq / fp8 vs the HBM roofline
#   scripts/bench_gpu.sh mixed triton        # mixed workload vs HF generate; sweeps through tritonserver (last:
#                                            # it switches to the serving venv)
#   scripts/bench_gpu.sh tp2                 # TP=2 on two GPUs: equality tests + sweep
#
# Run from the repository root on the GPU machine (PYTHONPATH is set here), in the machine's own Python (numpy 2).
# `triton` needs tritonserver, tritonclient and numpy < 2 for the python backend: it sources .device/setup.sh
# (../shared/device/README.md) itself, after the stages that need the image's numpy 2 (HF, builder build).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
BENCH="$PY scripts/bench_engine.py --random-llama3-8b --device cuda --roofline"

stage_tests() {
  BUILDER_GPU_REPORT=$OUT/gpu-report.jsonl timeout 240 $PY -m pytest -q -rf --tb=short -p no:cacheprovider \
    tests/test_engine_gpu.py > "$OUT/tests-engine.txt" 2>&1
  tail -n 25 "$OUT/tests-engine.txt"
  timeout 200 $PY -m pytest -q -rf --tb=line -p no:cacheprovider -n 12 tests/test_plugins_gpu.py \
    > "$OUT/tests-plugins.txt" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/tests-plugins.txt" | tail -n 15
}

stage_offline() {
  for io in "128 128" "1024 128"; do
    set -- $io
    $BENCH --input-len $1 --output-len $2 --concurrency 1 --num-requests 6 --out "$OUT/engine-$1-$2-c1.json" | tail -n 4
    $BENCH --input-len $1 --output-len $2 --concurrency 16,64,256 --num-requests 512 \
      --out "$OUT/engine-$1-$2.json" | grep -v "^|---" | tail -n 9
  done
}

stage_batch1() {
  for q in none int8_wo int4_awq fp8; do
    $BENCH --quant $q --batch1 --input-len 128 --output-len 256 --num-requests 3 --out "$OUT/batch1-$q.json" \
      | grep -E "roofline|^\| 1 " | tail -n 3
  done
}

stage_mixed() {
  $BENCH --workload mixed --num-requests 128 --concurrency all --hf --hf-batch-size 64 \
    --out "$OUT/mixed-vs-hf.json" | grep -v "^|---" | tail -n 12
  $BENCH --batch1 --hf --input-len 128 --output-len 128 --num-requests 4 --out "$OUT/batch1-vs-hf.json" \
    | grep -v "^|---" | tail -n 8
}

serving_env() {
  # numpy 1.26 for the python backend stub; the image's scipy / scikit-learn are built for numpy 2 and break
  # transformers' imports under 1.26 (seen 2026-11-21), so the venv sees the image packages without them
  source .device/setup.sh || return 1
  local pth
  pth=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_image_packages.pth
  local image
  image=$(cat "$pth")
  [ "$image" = /tmp/image-site ] && return 0
  mkdir -p /tmp/image-site
  for f in "$image"/*; do
    case $(basename "$f") in scipy*|sklearn*|scikit_learn*) ;; *) ln -sfn "$f" /tmp/image-site/ ;; esac
  done
  echo /tmp/image-site > "$pth"
}

stage_triton() {
  local ckpt=/tmp/random-llama3-8b repo=/tmp/repo-llama3-8b log=$OUT/server.log
  [ -d $ckpt ] || $PY scripts/make_random_checkpoint.py --shape llama3-8b --device cuda --out $ckpt | tail -n 2
  $PY -m builder.cli build --model $ckpt --output $repo --force --dtype bfloat16 --device cuda --eval off \
    --max-batch-size 256 --max-input-len 1024 --max-seq-len 1152 --max-num-tokens 8192 | tail -n 2 || return 1
  serving_env || return 1  # from here on server and client run in the numpy 1.26 venv (tritonclient is there)
  PY=python3
  $PY -m builder.cli serve $repo --grpc-port 18001 --http-port 18000 --metrics-port 18002 > $log 2>&1 &
  local server=$!
  for _ in $(seq 300); do grep -q "^builder: ready" $log && break; kill -0 $server 2>/dev/null || return 1; sleep 1; done
  $PY -m builder.cli bench --url localhost:18001 --repo $repo --input-len 128 --output-len 128 --concurrency 1 \
    --num-requests 6 --out "$OUT/triton-128-128-c1" | tail -n 3
  $PY -m builder.cli bench --url localhost:18001 --repo $repo --input-len 128 --output-len 128 \
    --concurrency 16,64,256 --num-requests 512 --out "$OUT/triton-128-128" | grep -v "^|---" | tail -n 6
  $PY -m builder.cli bench --url localhost:18001 --repo $repo --workload mixed --num-requests 128 \
    --request-rate inf --out "$OUT/triton-mixed" | grep -v "^|---" | tail -n 4
  $PY -m builder.cli bench --url localhost:18001 --repo $repo --input-len 1024 --output-len 128 \
    --concurrency 16,64,256 --num-requests 256 --out "$OUT/triton-1024-128" | grep -v "^|---" | tail -n 6
  kill $server; wait $server 2>/dev/null
}

stage_tp2() {
  BUILDER_GPU_REPORT=$OUT/gpu-report-tp2.jsonl timeout 240 $PY -m pytest -q -rf --tb=short -p no:cacheprovider \
    tests/test_engine_gpu.py -k "tp2 or fp32_greedy" 2>&1 | tail -n 8
  local ckpt=/tmp/random-llama3-8b
  [ -d $ckpt ] || $PY scripts/make_random_checkpoint.py --shape llama3-8b --device cuda --out $ckpt | tail -n 2
  for tp in 1 2; do
    $PY -m builder.cli build --model $ckpt --output /tmp/repo-tp$tp --force --dtype bfloat16 --device cuda \
      --eval off --tp $tp --max-batch-size 64 --max-input-len 128 --max-seq-len 256 | tail -n 1
    for point in "1 4" "64 256"; do
      set -- $point
      $PY scripts/bench_engine.py --engine /tmp/repo-tp$tp/tensorrt_llm/1/engine --device cuda --input-len 128 \
        --output-len 128 --concurrency $1 --num-requests $2 --out "$OUT/engine-tp$tp-128-128-c$1.json" | tail -n 3
    done
  done
}

for stage in "$@"; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  "stage_$stage"
done
