#!/usr/bin/env bash
# One part of a GPU round, each well inside the device tool's 10-minute limit; results under $OUT.
#
#   bash benchmarks/gpu_round.sh tests        # every GPU test, eight pytest processes at once
#   bash benchmarks/gpu_round.sh examples     # maskdsl check, then every example at full size
#   bash benchmarks/gpu_round.sh bench 64     # the attention harness at D = 64 (N = 4096, 16384, trees)
#   bash benchmarks/gpu_round.sh preprocess   # tensor-mask preprocessing and reordering report
#   bash benchmarks/gpu_round.sh host         # host (CPU) time against GPU time of md.attention
#
# Run from the repository root on the device machine (PYTHONPATH=$PWD: the image's torch and
# triton, not a pip install). MASKDSL_COMMIT names the measured commit in the CSVs: the device's
# copy of .git may be stale, so write the hash in as a literal taken on the machine that committed
# (MASKDSL_COMMIT=abc1234 bash benchmarks/gpu_round.sh bench 64), not as $(git rev-parse HEAD) run
# on the device (session 6 recorded a stale hash that way).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
part=${1:?usage: gpu_round.sh tests|examples|bench D|preprocess|host}

case $part in
tests)
  # Compiling the kernels is most of the time and runs on the CPU: split the tests over processes.
  pt() { timeout 540 python -m pytest -q -p no:logging -p no:cacheprovider "$@"; }
  for i in 0 1 2 3 4 5; do
    MASKDSL_SHARD=$i/6 pt -m gpu tests/test_kernels.py > "$OUT/tests_kernels_$i.txt" 2>&1 &
  done
  pt -m gpu tests/test_preprocess.py tests/test_compile.py > "$OUT/tests_preprocess_compile.txt" 2>&1 &
  # the CPU tests that take the CUDA path when a GPU is there (reordering, interleaving, the CLI,
  # the int64-offset kernels)
  pt tests/test_reorder.py tests/test_expr_and_cli.py tests/test_attention_api.py \
    "tests/test_kernels.py::test_int64_offsets_path" > "$OUT/tests_cuda_paths.txt" 2>&1 &
  wait
  for f in "$OUT"/tests_*.txt; do echo "== $f"; grep -E "passed|failed|error" "$f" | tail -2; grep FAILED "$f" | head; done
  ;;
examples)
  # Run this part alone: next to the tests' compile load (session 5) packed_finetune.py printed its
  # training but not its closing timing line within its limit.
  python -m maskdsl.cli check 2>&1 | tee "$OUT/check.txt"
  for ex in examples/[a-z]*.py; do
    echo "== $ex"; timeout 170 python "$ex" --full 2>&1 | tail -12 | tee -a "$OUT/examples.txt"; echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/examples.txt"
  done
  ;;
bench)
  d=${2:?usage: gpu_round.sh bench 64|128}
  W=full,causal,alpaca_seq,alpaca_bidir,lf_window,lf_dilated,lf_global
  P=maskdsl,flex_default,flex_64,varlen,sdpa_mask,sdpa_flash,cudnn,ideal
  # compile first, one process per workload at once (timings thrown away): compiling is CPU work,
  # and the timed runs below then find Triton's and Inductor's caches warm (session 6)
  for w in ${W//,/ } medusa_5x5,medusa_8x3; do
    timeout 300 python benchmarks/bench_attention.py --workloads "$w" --n 4096,16384 --d "$d" \
      --providers maskdsl,flex_default,flex_64 --modes fwd,fwdbwd > /dev/null 2>&1 &
  done
  wait
  for n in 4096 16384; do
    timeout 250 python benchmarks/bench_attention.py --workloads $W --n $n --d "$d" --providers $P \
      --csv "$OUT/attention_d${d}.csv" 2>>"$OUT/bench_d${d}.log" | tail -16
  done
  timeout 60 python benchmarks/bench_attention.py --workloads medusa_5x5,medusa_8x3 --d "$d" --providers $P \
    --csv "$OUT/attention_d${d}.csv" 2>>"$OUT/bench_d${d}.log" | tail -6
  ;;
host)
  timeout 300 python benchmarks/host_overhead.py 2>&1 | grep -v -i warn | tee "$OUT/host_overhead.txt"
  ;;
preprocess)
  timeout 500 python benchmarks/bench_preprocess.py --out "$OUT/preprocess.md" --png "$OUT/reordering.png" 2>&1 | tail -30
  ;;
*)
  echo "unknown part $part" >&2; exit 2
  ;;
esac
