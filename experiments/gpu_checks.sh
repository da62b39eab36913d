#!/usr/bin/env bash
# The GPU checks of issues 4 and 5 as one prepared script, for a session that is lent a GPU machine.
#
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#   device run: command="bash experiments/gpu_checks.sh", carry=["data/fashion-mnist"], timeout_s=600
#
# The limits add up to 530 s (the device tool allows 600 s a call). Uses the machine's own torch/torchvision/timm (nothing is installed: the repository is put on
# PYTHONPATH). Each step has its own time limit so one slow step cannot eat the others' time; every
# output lands under $OUT (the device tool brings it back). DEVICE=cpu SMOKE=1 runs the same steps tiny
# on a CPU, to check this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu_checks}"
DEVICE="${DEVICE:-cuda}"
SMOKE="${SMOKE:-0}"
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, remember a failure
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; tail:"
  tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [ "$SMOKE" = 1 ]; then
  bench_mixing_args=(--quick) bench_step_args=(--quick) depth_args=(--smoke)
else
  # aot_eager: the graph count is the point here; inductor would spend minutes compiling 6 ResNet-50s
  bench_mixing_args=() bench_step_args=(--compile-steps 20 --compile-backend aot_eager)
  # a larger depth ablation than the CPU default: ResNet-20 on 5k images, 30 epochs, 2 seeds (resumable:
  # if the limit cuts it, the finished runs are in results.csv and a rerun continues)
  depth_args=(--model resnet20_cifar --train-subset 5000 --epochs 30 --eval-every 15 --seeds 0 1 --amp
              --channels-last)
fi
sync_arg=()
[ "$DEVICE" = cuda ] && sync_arg=(--sync-debug)
data_arg=()
[ -d data/fashion-mnist ] && data_arg=(--data-dir data/fashion-mnist)

FEATMIX_TEST_DEVICE="$DEVICE" step tests 60 python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/test_sampling.py tests/test_fastpaths.py -x
step bench_mixing 120 python -m experiments.bench.mixing --device "$DEVICE" "${bench_mixing_args[@]}" \
  --out "$OUT/bench_mixing.json"
step bench_step 150 python -m experiments.bench.step --device "$DEVICE" "${sync_arg[@]}" "${bench_step_args[@]}" \
  --out "$OUT/bench_step.json"
step depth_ablation 200 python -m experiments.depth_ablation --device "$DEVICE" "${data_arg[@]}" \
  "${depth_args[@]}" --no-progress --out "$OUT/depth_ablation"
# --- study throughput (issue 14): eager / compiled / compiled + --jobs 2 for ResNet-20, baseline + CutMix at the
# input, 2 seeds x 2 epochs on 5,120 Fashion-MNIST images (or tiny synthetic data with SMOKE=1, dynamo's eager
# backend). Limit 60 s: with the steps above, the limits add up to 590 s. Table: $OUT/throughput/throughput.md
throughput_args=()
[ "$SMOKE" = 1 ] && throughput_args=(--smoke)
step throughput 60 python -m experiments.throughput --device "$DEVICE" "${data_arg[@]}" "${throughput_args[@]}" \
  --out "$OUT/throughput"
# --- end of the study throughput step

echo "gpu_checks: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED), outputs in $OUT"
exit $status
