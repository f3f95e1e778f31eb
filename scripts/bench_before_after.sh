#!/usr/bin/env bash
# Engine-alone speed of two trees on one GPU in one run (issue #12's "no regression" check): OLD is an export of an
# earlier commit in ./oldtree (git archive COMMIT builder plugins scripts | tar -x -C oldtree), NEW the working tree.
# Llama-3-8B shape, random bf16 weights: batch-1 decode (128 in, 256 out, 3 requests) and 128/128 at 256 concurrent
# (512 requests), alternating OLD and NEW (ORDER, ORDER_C); then the Qwen3-8B shape's batch-1 decode (NO_QWEN=1 skips).
# Results under OUT. On the GPU machine:  export OUT; bash scripts/bench_before_after.sh
set -u
B="--random llama3-8b --device cuda --roofline --max-batch-size 256"
run() {  # run VERSION NAME ARGS...
  local v=$1 name=$2; shift 2
  local dir=$PWD; [ "$v" = old ] && dir=$PWD/oldtree
  PYTHONPATH=$dir python3 $dir/scripts/bench_engine.py "$@" --out $OUT/$name-$v.json 2>&1 | grep -E "roofline|^\| (1|256) " | tail -n 3
}
nvidia-smi --query-gpu=name --format=csv,noheader
for v in ${ORDER:-old new old new}; do
  echo "== $v bs1 $(date +%T)"; run $v bs1 $B --batch1 --input-len 128 --output-len 256 --num-requests 3
done
for v in ${ORDER_C:-old new}; do
  echo "== $v 128/128 at 256 $(date +%T)"; run $v c256 $B --input-len 128 --output-len 128 --concurrency 256 --num-requests 512
done
[ -n "${NO_QWEN:-}" ] && exit 0
echo "== qwen3-8b bs1 $(date +%T)"
PYTHONPATH=$PWD python3 scripts/bench_engine.py --random qwen3-8b --device cuda --roofline --batch1 --input-len 128 \
  --output-len 256 --num-requests 3 --out $OUT/qwen3-bs1.json 2>&1 | grep -E "roofline|^\| 1 " | tail -n 3
echo "== done $(date +%T)"
