#!/usr/bin/env bash
# Device call 4 on the H200 (see README.md): unpack CIFAR-10 (.dstage/d0..d2), start one Ray node with the GPU, run
# every line of PLAN as its own `train` (1 worker, GPU_SHARE of the GPU each) and, with SWEEP=1, the full-length
# sweep tune_configs/fast_sweep.yaml (SWEEP_FLAGS: its 6 trials at once, 1/8 GPU each) beside them, all at once. Everything stops by STOP_AFTER seconds (SIGINT:
# checkpoints are kept); logs, results.json and the newest and best checkpoint of every run come back in $OUT.
set -u
PLAN=${PLAN:-experiments/fast_recipe/h200/plan.txt}; GPU_SHARE=${GPU_SHARE:-0.04}; SWEEP=${SWEEP:-1}
STOP_AFTER=${STOP_AFTER:-480}; SWEEP_CONFIG=${SWEEP_CONFIG:-tune_configs/fast_sweep.yaml}
SWEEP_FLAGS=${SWEEP_FLAGS:---cpus-per-worker 1 --gpus-per-worker 0.125 --max-concurrent-trials 6}
GPU_FLAGS=${GPU_FLAGS:---gpu --gpus-per-worker $GPU_SHARE}; EXTRA=${EXTRA:-}; NUM_CPUS=${NUM_CPUS:-16}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
python3 -c 'import ray' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dstage/w/wheels/*.whl || exit 1
cat ${PARTS:-.dstage/d0/part.bin .dstage/d1/part.bin .dstage/d2/part.bin} > /tmp/pt.tar || exit 1
[ "$(sha256sum /tmp/pt.tar | cut -d' ' -f1)" = "${DATA_SHA:-$(cat .dstage/w/data.sha256)}" ] || { echo "data checksum mismatch"; exit 1; }
mkdir -p /tmp/c10 /tmp/logs /tmp/runs && tar -C /tmp/c10 -xf /tmp/pt.tar && rm /tmp/pt.tar
ray start --head --port 6379 --num-cpus "$NUM_CPUS" --num-gpus 1 --disable-usage-stats > /tmp/logs/ray_start.log 2>&1 || { cat /tmp/logs/ray_start.log; exit 1; }
left=$((STOP_AFTER - ($(date +%s) - t0)))
echo "setup took $(( $(date +%s) - t0 )) s; runs get $left s"
while IFS='|' read -r name args; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$left" python3 -m distributed_resnet.train --address 127.0.0.1:6379 $GPU_FLAGS --num-workers 1 --cpus-per-worker 1 --data-dir /tmp/c10 \
      --storage-path /tmp/runs --name "$name" $args $EXTRA > "/tmp/logs/$name.log" 2>&1 &
done < "$PLAN"
if [ "$SWEEP" = 1 ]; then
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$left" python3 -m distributed_resnet.tune --config "$SWEEP_CONFIG" $SWEEP_FLAGS \
      --data-dir /tmp/c10 --storage-path /tmp/runs --address 127.0.0.1:6379 > /tmp/logs/sweep.log 2>&1 &
fi
snapshot() { tar --exclude='checkpoint_*' -czf "$OUT/logs.tgz.part" -C /tmp logs runs 2>/dev/null && mv "$OUT/logs.tgz.part" "$OUT/logs.tgz"; }
( while sleep 30; do snapshot; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> /tmp/logs/gpu_util.log; done ) &
watcher=$!
wait $(jobs -p | grep -v "^$watcher$")
kill $watcher 2>/dev/null
echo "runs ended after $(( $(date +%s) - t0 )) s"
grep -h -E '^(best|test|summary|wall)|accuracy' /tmp/logs/*.log | tail -40
snapshot
python3 experiments/fast_recipe/h200/pack.py /tmp/runs "$OUT"
ls -la "$OUT"
