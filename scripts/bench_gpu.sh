#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, one stage per argument, results under OUT (default ./gpu-results).
#
#   scripts/bench_gpu.sh tests offline       # GPU tests + engine-alone sweeps (Llama-3-8B shape, random bf16)
#   scripts/bench_gpu.sh batch1              # batch-1 decode bf16 / int8_wo / int4_awq / fp8 vs the HBM roofline
#   scripts/bench_gpu.sh mixed triton        # mixed workload vs HF generate; engine alone then tritonserver on one
#                                            # built engine (put triton last: it switches to the serving venv)
#   scripts/bench_gpu.sh soak                # issue #20's soak: 1,000 streams at 256, 20% cancelled, then none
#   scripts/bench_gpu.sh tp2                 # TP=2 on two GPUs: equality tests + batch 1 and 64 at TP 1 and 2
#   QUICK=1 scripts/bench_gpu.sh triton      # only the 128/128 sweep at 16, 64, 256 (engine alone, then Triton)
#   scripts/bench_gpu.sh profile             # 128/128 + mixed, engine alone then served (one server per SERVER_ENVS
#                                            # entry), with py-spy profiles of the three python models under load
#
# Run from the repository root on the GPU machine (PYTHONPATH is set here), in the machine's own Python (numpy 2).
# `triton` needs tritonserver, tritonclient and numpy < 2 for the python backend: when tritonclient is missing it
# sources .device/setup.sh (../shared/device/README.md) after the build, which needs the image's numpy 2.
# Dry run of the stages' plumbing on a CPU machine with the tiny shape and short requests:
#   SMALL=1 PYTHON=.venv/bin/python scripts/bench_gpu.sh offline mixed triton
set -uo pipefail
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
if [ "${SMALL:-0}" = 1 ]; then
  SHAPE=tiny DEVICE=cpu DTYPE=float32 SHORT=16 LONG=64 OUT_LEN=8 MAX_SEQ=96 N=8 LEVELS=2,4 C_BIG=4 NMIX=6
  MIX_RANGES="--input-range 8-32 --output-range 4-16" ROOF="" C_SOAK=16
else
  SHAPE=llama3-8b DEVICE=cuda DTYPE=bfloat16 SHORT=128 LONG=1024 OUT_LEN=128 MAX_SEQ=1536 N=512 LEVELS=16,64,256
  C_BIG=64 NMIX=128 MIX_RANGES="" ROOF="--roofline" C_SOAK=256
fi
BENCH="$PY scripts/bench_engine.py --random $SHAPE --device $DEVICE $ROOF"
CKPT=/tmp/random-$SHAPE
# RANDOM_LAYERS=N: the shape with N decoder layers only (quick checks that need the layer shapes, not the depth)
[ -n "${RANDOM_LAYERS:-}" ] && CKPT=$CKPT-L$RANDOM_LAYERS

stage_tests() {
  stage_engine_tests
  stage_plugin_tests
}

stage_engine_tests() {
  BUILDER_GPU_REPORT=$OUT/gpu-report.jsonl timeout 240 $PY -m pytest -q -rf --tb=short -p no:cacheprovider \
    tests/test_engine_gpu.py > "$OUT/tests-engine.txt" 2>&1
  tail -n 25 "$OUT/tests-engine.txt"
}

stage_plugin_tests() {
  timeout 300 $PY -m pytest -q -rf --tb=line -p no:cacheprovider -n 12 tests/test_plugins_gpu.py \
    > "$OUT/tests-plugins.txt" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/tests-plugins.txt" | tail -n 15
}

stage_offline() {
  for in_len in $SHORT $LONG; do
    $BENCH --input-len $in_len --output-len $OUT_LEN --concurrency 1 --num-requests 6 \
      --out "$OUT/engine-$in_len-$OUT_LEN-c1.json" | tail -n 4
    $BENCH --input-len $in_len --output-len $OUT_LEN --concurrency $LEVELS --num-requests $N \
      --out "$OUT/engine-$in_len-$OUT_LEN.json" | grep -v "^|---" | tail -n 9
  done
}

stage_batch1() {
  for q in none int8_wo int4_awq fp8; do
    $BENCH --quant $q --batch1 --input-len $SHORT --output-len $((2 * OUT_LEN)) --num-requests 3 \
      --out "$OUT/batch1-$q.json" | grep -E "roofline|^\| 1 " | tail -n 3
  done
}

stage_mixed() {
  $BENCH --workload mixed $MIX_RANGES --num-requests $NMIX --concurrency all --hf --hf-batch-size 64 \
    --out "$OUT/mixed-vs-hf.json" | grep -v "^|---" | tail -n 12
  $BENCH --batch1 --hf --input-len $SHORT --output-len $OUT_LEN --num-requests 4 --out "$OUT/batch1-vs-hf.json" \
    | grep -v "^|---" | tail -n 8
}

random_checkpoint() {
  [ -d $CKPT ] || $PY scripts/make_random_checkpoint.py --shape $SHAPE --device $DEVICE --out $CKPT \
    ${RANDOM_LAYERS:+--num-layers $RANDOM_LAYERS} | tail -n 2
}

serving_env() {
  # numpy 1.26 for the python backend stub; the image's scipy / scikit-learn are built for numpy 2 and break
  # transformers' imports under 1.26 (seen 2026-11-21), so the venv sees the image packages without them
  # a Python with the client and a server (on PATH or the nvidia-pytriton wheel) needs nothing more
  $PY -c "import shutil, sys, importlib.util as u, tritonclient.grpc
sys.exit(0 if shutil.which('tritonserver') or u.find_spec('pytriton') else 1)" 2>/dev/null && return 0
  export PYTHONPATH=$PWD  # without client_wheel's folder: the venv has its own client
  source .device/setup.sh || return 1
  PY=python3
  local pth image
  pth=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_image_packages.pth
  image=$(cat "$pth")
  [ "$image" = /tmp/image-site ] && return 0
  mkdir -p /tmp/image-site
  for f in "$image"/*; do
    case $(basename "$f") in scipy*|sklearn*|scikit_learn*) ;; *) ln -sfn "$f" /tmp/image-site/ ;; esac
  done
  echo /tmp/image-site > "$pth"
}

engine_bench() {
  # engine_bench NAME ARGS...: the engine alone, on the engine the server loads, for the side-by-side figures
  local name=$1
  shift
  $PY scripts/bench_engine.py --engine $REPO/tensorrt_llm/1/engine --device $DEVICE --max-batch-size 256 \
    --out "$OUT/engine-$name.json" "$@" | grep -v "^|---" | tail -n 6
}

serve_bench() {
  # serve_bench NAME ARGS...: one `builder bench` run against the server on port 18001
  local name=$1
  shift
  $PY -m builder.cli bench --url localhost:18001 --repo $REPO --out "$OUT/triton-$name" "$@" \
    | grep -v "^|---" | tail -n 6
}

client_wheel() {
  # the build validates config.pbtxt with tritonclient's protobuf classes: without tritonclient in this Python,
  # add the wheel from .device on PYTHONPATH (no numpy pin needed for the build)
  $PY -c "import tritonclient.grpc" 2>/dev/null && return 0
  $PY -m pip install -q --no-index --no-deps --target /tmp/client-wheel .device/tritonclient-*.whl \
    .device/python_rapidjson-*.whl || return 1
  export PYTHONPATH=$PYTHONPATH:/tmp/client-wheel
}

triton_points() {
  # triton_points BENCH MIXED_ARRIVAL...: the served sweep points through BENCH (engine_bench or serve_bench);
  # the mixed workload arrives all at once (MIXED_ARRIVAL). QUICK=1: only 128/128 at LEVELS (short device sessions)
  local bench=$1
  shift
  [ "${QUICK:-0}" = 1 ] || $bench $SHORT-$OUT_LEN-c1 --input-len $SHORT --output-len $OUT_LEN --concurrency 1 \
    --num-requests 6
  $bench $SHORT-$OUT_LEN --input-len $SHORT --output-len $OUT_LEN --concurrency $LEVELS --num-requests $((N / 2))
  [ "${QUICK:-0}" = 1 ] && return 0
  $bench mixed --workload mixed $MIX_RANGES --num-requests $NMIX "$@"
  $bench $LONG-$OUT_LEN --input-len $LONG --output-len $OUT_LEN --concurrency $LEVELS --num-requests $((N / 2))
  $bench $LONG-$OUT_LEN-c1 --input-len $LONG --output-len $OUT_LEN --concurrency 1 --num-requests 6
}

served_repo() {
  # the repository the served stages load (REPO), built once per machine
  # SERVE_DTYPE=float32 serves the same (bf16-drawn) weights in fp32: the soak's solo comparison then sees no
  # bf16 rounding of batched-vs-alone kernels
  local dtype=${SERVE_DTYPE:-$DTYPE}
  REPO=/tmp/repo-$(basename $CKPT)-$dtype
  random_checkpoint
  client_wheel || return 1
  [ -f $REPO/ensemble/config.pbtxt ] && return 0
  $PY -m builder.cli build --model $CKPT --output $REPO --force --dtype $dtype --device $DEVICE --eval off \
    --max-batch-size 256 --max-input-len $LONG --max-seq-len $MAX_SEQ --max-num-tokens 8192 \
    --preprocessing-instances ${PRE_INSTANCES:-4} | tail -n 2
}

start_server() {
  # start_server LOG [VAR=VALUE...]: tritonserver on REPO (ports 18000-18002) in the background as SERVER, with
  # those environment variables; waits until ready
  local log=$1
  shift
  env "$@" $PY -m builder.cli serve $REPO --grpc-port 18001 --http-port 18000 --metrics-port 18002 > $log 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do
    grep -q "^builder: ready" $log && return 0
    kill -0 $SERVER 2>/dev/null || { tail -n 5 $log; return 1; }
    sleep 1
  done
  return 1
}

stop_server() {
  # per-model request counts and busy times (where the served path spends its time) to FILE, then stop SERVER
  $PY -c "import urllib.request; print(urllib.request.urlopen('http://localhost:18002/metrics').read().decode())" \
    > "$1" 2>&1
  grep -E "^nv_inference_(request_success|exec_count|compute_infer_duration_us|queue_duration_us)" "$1" \
    | sed 's/,version="1"//'
  kill $SERVER
  wait $SERVER 2>/dev/null
}

stage_triton() {
  served_repo || return 1
  # the same points on the engine alone first (same engine files, same limits), for the side-by-side ratios
  triton_points engine_bench --concurrency all
  serving_env || return 1  # from here on server and client run in the serving environment
  start_server $OUT/server.log || return 1
  triton_points serve_bench --request-rate inf
  stop_server "$OUT/triton-metrics.txt"
}

stage_soak() {
  # issue #20's soak on the served repository: SOAK_N streams at SOAK_C concurrent with 20% cancelled by their clients,
  # then SOAK_N with none; each must pass builder.soak's checks with the server still alive afterwards
  echo "$(date +%T) soak: repository"
  served_repo || return 1
  serving_env || return 1
  echo "$(date +%T) soak: starting the server on $REPO"
  start_server $OUT/server-soak.log || return 1
  local rc=0 cancel
  for cancel in ${SOAK_CANCELS:-0.2 0}; do
    echo "$(date +%T) soak: cancel $cancel"
    $PY scripts/soak.py --url localhost:18001 --metrics-url http://localhost:18002/metrics \
      --requests ${SOAK_N:-1000} --concurrency ${SOAK_C:-$C_SOAK} --sample ${SOAK_SAMPLE:-16} --cancel $cancel --out "$OUT/soak-$cancel.json" \
      || rc=1
    kill -0 $SERVER 2>/dev/null || { echo "tritonserver died"; tail -n 5 $OUT/server-soak.log; return 1; }
  done
  stop_server "$OUT/soak-metrics.txt"
  return $rc
}

spy() {
  # spy MODEL NAME ARGS...: py-spy samples MODEL's python-backend stub for 8 s into profile-NAME.txt (background;
  # its pid is added to SPIES)
  local model=$1 name=$2
  shift 2
  /tmp/py-spy/bin/py-spy record --pid "$(pgrep -f "$model/1/model.py" | head -n 1)" --duration 8 --format raw "$@" \
    -o "$OUT/profile-$name.txt" >> "$OUT/py-spy.log" 2>&1 &
  SPIES="$SPIES $!"
}

profile_load() {
  # profile_load C: 128/128 load at concurrency C on the running server; after PROFILE_DELAY_S (default 8, the
  # client's start-up) the three stubs are sampled (every thread, the GIL holder, preprocessing's native frames),
  # with the threads' CPU use (top) and the cgroup's CPU throttling before and after
  $PY -m builder.cli bench --url localhost:18001 --repo $REPO --out "$OUT/profile-load" --input-len $SHORT \
    --output-len $OUT_LEN --concurrency $1 --num-requests $((6 * $1)) > /dev/null 2>&1 &
  local load=$! model
  SPIES=""
  cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.stat > "$OUT/cgroup-cpu.txt" 2>&1
  sleep ${PROFILE_DELAY_S:-8}
  for model in tensorrt_llm preprocessing postprocessing; do
    spy $model $model --rate 250 --threads --idle --nonblocking
  done
  spy tensorrt_llm gil --rate 250 --gil --nonblocking
  spy preprocessing preprocessing-native --rate 100 --native --idle  # pauses the process per sample
  sleep 2
  top -H -b -n 1 -w 250 | head -n 45 > "$OUT/top-threads.txt"
  wait $load $SPIES
  echo "-- after the load" >> "$OUT/cgroup-cpu.txt"
  cat /sys/fs/cgroup/cpu.stat >> "$OUT/cgroup-cpu.txt" 2>&1
  grep -c Wrote "$OUT/py-spy.log"
  head -n 25 "$OUT/top-threads.txt"
}

stage_profile() {
  # where the served path's time goes under load. SERVER_ENVS (default "BUILDER_BASELINE=1
  # TOKENIZERS_PARALLELISM=false"): one server per entry, started with that variable set (PRE_INSTANCES=N: that
  # many preprocessing instances instead), serving the 128/128 sweep and the mixed workload after the engine alone;
  # the first one is profiled under C_PROFILE (default 256) streams (profile_load; py-spy's wheel in .device)
  served_repo || return 1
  QUICK=1 triton_points engine_bench
  engine_bench mixed --workload mixed $MIX_RANGES --num-requests $NMIX --concurrency all
  serving_env || return 1
  $PY -m pip install -q --no-index --no-deps --target /tmp/py-spy .device/py_spy-*.whl || return 1
  local variant pre=$REPO/preprocessing/config.pbtxt
  [ -f $pre.orig ] || cp $pre $pre.orig
  for variant in ${SERVER_ENVS:-BUILDER_BASELINE=1 TOKENIZERS_PARALLELISM=false}; do
    echo "-- server with $variant"
    cp $pre.orig $pre
    case $variant in
      PRE_INSTANCES=*) sed -i "s/{ count: [0-9]* kind: KIND_CPU }/{ count: ${variant#*=} kind: KIND_CPU }/" $pre ;;
    esac
    start_server $OUT/server-${variant%%=*}.log $variant || return 1
    QUICK=1 triton_points serve_bench --request-rate inf
    serve_bench mixed --workload mixed $MIX_RANGES --num-requests $NMIX --request-rate inf
    mv "$OUT/triton-$SHORT-$OUT_LEN" "$OUT/triton-$SHORT-$OUT_LEN-${variant%%=*}"
    mv "$OUT/triton-mixed" "$OUT/triton-mixed-${variant%%=*}"
    [ -f "$OUT/profile-gil.txt" ] || profile_load ${C_PROFILE:-256}
    stop_server "$OUT/triton-metrics-${variant%%=*}.txt"
  done
}

stage_tp2() {
  # first the bare collectives (scripts/check_tp.py), then the engine tests. Output to files, not pipes: worker
  # ranks of a hung run would hold a pipe open past the timeout. A hung test fails after 100 s with every thread's
  # stack (pytest-timeout), NCCL collectives after 60 s.
  timeout 150 $PY scripts/check_tp.py --world-size 2 --device $DEVICE --timeout 30 > "$OUT/check-tp.txt" 2>&1
  cat "$OUT/check-tp.txt"
  local timeout_opt=""
  $PY -c "import pytest_timeout" 2>/dev/null && timeout_opt="--timeout 100"
  NCCL_DEBUG=${NCCL_DEBUG:-WARN} BUILDER_TP_TIMEOUT_S=60 BUILDER_GPU_REPORT=$OUT/gpu-report-tp2.jsonl \
    timeout 300 $PY -m pytest -v -rf --tb=short -p no:cacheprovider $timeout_opt tests/test_engine_gpu.py \
    -k "tp2 or kv_pool" \
    > "$OUT/tests-tp2.txt" 2>&1
  grep -E "PASSED|FAILED|ERROR|SKIPPED|Timeout|passed|failed" "$OUT/tests-tp2.txt" | tail -n 12
  pkill -f "multiprocessing.spawn import spawn_main"  # worker ranks a killed test may have left behind
  random_checkpoint
  client_wheel || return 1
  for tp in 1 2; do
    $PY -m builder.cli build --model $CKPT --output /tmp/repo-tp$tp --force --dtype $DTYPE --device $DEVICE \
      --eval off --tp $tp --max-batch-size $C_BIG --max-input-len $SHORT --max-seq-len $((SHORT + OUT_LEN)) \
      | tail -n 1
    for point in "1 4" "$C_BIG $((4 * C_BIG))"; do
      set -- $point
      $PY scripts/bench_engine.py --engine /tmp/repo-tp$tp/tensorrt_llm/1/engine --device $DEVICE \
        --input-len $SHORT --output-len $OUT_LEN --concurrency $1 --num-requests $2 \
        --out "$OUT/engine-tp$tp-$SHORT-$OUT_LEN-c$1.json" | tail -n 3
    done
  done
}

for stage in "$@"; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  "stage_$stage"
done
