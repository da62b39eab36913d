#!/usr/bin/env bash
# The GPU checks as one prepared script, for a session that is lent a GPU machine.
#
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#   device run: command="bash experiments/gpu_checks.sh", carry=["data/fashion-mnist"], timeout_s=600
#
# The step limits add up to 580 s (the device tool allows 600 s a call). Uses the machine's own
# torch/torchvision/timm (nothing is installed: the repository is put on PYTHONPATH). Each step has its
# own time limit so one slow step cannot eat the others' time. Logs and JSON go to $WORK; at the end they
# are packed into one $OUT/gpu_checks.tgz beside $OUT/summary.txt (the device tool brings back at most
# 8 files), and the summary lists every target MET/MISSED. DEVICE=cpu SMOKE=1 runs the same steps tiny
# on a CPU, to check this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu_checks}"
WORK="${WORK:-runs/gpu_checks_work}"
DEVICE="${DEVICE:-cuda}"
SMOKE="${SMOKE:-0}"
mkdir -p "$OUT" "$WORK"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $WORK/NAME.log, remember a failure
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; tail:"
  tail -n 25 "$WORK/$name.log" | sed 's/^/   | /'
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt"

if [ "$SMOKE" = 1 ]; then
  bench_mixing_args=(--quick) bench_step_args=(--quick) compiled_args=(--quick) depth_args=(--smoke)
  pyramid_args=(--quick --modes eager)
else
  # aot_eager: the graph count is the point here; inductor would spend minutes compiling 6 ResNet-50s.
  # bf16 + channels_last: the eager ResNet-50 target (< 2% overhead) is stated for that setup.
  bench_mixing_args=() bench_step_args=(--compile-steps 20 --compile-backend aot_eager --amp --channels-last)
  # ResNet-20 b128 32x32: eager, torch.compile and CUDA graphs (reduce-overhead), plain vs CutMixAt(layer=2)
  compiled_args=(--models resnet20_cifar:128:32 --layers 2)
  # the paper's model at the paper's batch, eager only (compiling it outlasts a step's limit): its step time
  # prices the paper-scale run (docs/paper-recipe.md)
  pyramid_args=(--models pyramidnet200_a240:64:32 --modes eager --layers 2 --steps 10 --warmup 3)
  # a larger depth ablation than the CPU default: ResNet-20 on 5k images, 20 epochs, 2 seeds (resumable:
  # if the limit cuts it, the finished runs are in results.csv and a rerun continues)
  # (--no-compile: the studies compile by default on CUDA; the throughput step measures that)
  depth_args=(--model resnet20_cifar --train-subset 5000 --epochs 20 --eval-every 10 --seeds 0 1 --amp
              --channels-last --no-compile)
fi
sync_arg=()
[ "$DEVICE" = cuda ] && sync_arg=(--sync-debug)
data_arg=()
[ -d data/fashion-mnist ] && data_arg=(--data-dir data/fashion-mnist)

# no -x: one failing test must not hide the others
FEATMIX_TEST_DEVICE="$DEVICE" step tests 60 python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/test_sampling.py tests/test_fastpaths.py
step bench_mixing 90 python -m experiments.bench.mixing --device "$DEVICE" "${bench_mixing_args[@]}" \
  --out "$WORK/bench_mixing.json"
step bench_step 100 python -m experiments.bench.step --device "$DEVICE" "${sync_arg[@]}" "${bench_step_args[@]}" \
  --out "$WORK/bench_step.json"
step bench_compiled 150 python -m experiments.bench.compiled --device "$DEVICE" "${compiled_args[@]}" \
  --out "$WORK/bench_compiled.json"
step pyramidnet_step 40 python -m experiments.bench.compiled --device "$DEVICE" "${pyramid_args[@]}" \
  --out "$WORK/pyramidnet_step.json"
step depth_ablation 80 python -m experiments.depth_ablation --device "$DEVICE" "${data_arg[@]}" \
  "${depth_args[@]}" --no-progress --out "$WORK/depth_ablation"
# --- study throughput: eager / compiled / compiled + --jobs 2 for ResNet-20, baseline + CutMix at the
# input, 2 seeds x 2 epochs on 5,120 Fashion-MNIST images (or tiny synthetic data with SMOKE=1, dynamo's eager
# backend). Table: $WORK/throughput/throughput.md
throughput_args=()
[ "$SMOKE" = 1 ] && throughput_args=(--smoke)
step throughput 60 python -m experiments.throughput --device "$DEVICE" "${data_arg[@]}" "${throughput_args[@]}" \
  --out "$WORK/throughput"
# --- end of the study throughput step

{
  echo "gpu_checks: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
  cat "$WORK/environment.txt"
  echo "== targets"
  grep -h -E "MET|MISSED|^target" "$WORK"/*.log
  echo "== test summary"
  tail -n 3 "$WORK/tests.log"
} >"$OUT/summary.txt" 2>&1
tar czf "$OUT/gpu_checks.tgz" -C "$WORK" .
cat "$OUT/summary.txt"
echo "outputs: $OUT/summary.txt and $OUT/gpu_checks.tgz (everything under $WORK)"
exit $status
