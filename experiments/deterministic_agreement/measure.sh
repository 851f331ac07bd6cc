#!/bin/bash
# fp32 agreement of 1, 2 and 3 workers with --deterministic, through a running cluster (issue 15)
set -x
cd /work/frozen-det
export PYTHONPATH=/work/frozen-det RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
PY=/work/main/.venv/bin/python
RAYBIN=/work/main/.venv/bin/ray
$RAYBIN stop --force >/dev/null 2>&1
$RAYBIN start --head --num-cpus 3 --port 46379 --include-dashboard false --disable-usage-stats
COMMON="--address 127.0.0.1:46379 --precision fp32 --deterministic --cpus-per-worker 1 --epochs 3 --max-train-samples 6000 --val-size 2000 --data-dir /work/shared/cifar10 --storage-path /work/det-runs"
for run in "1 0" "2 0" "3 0" "1 1"; do
  set -- $run
  /usr/bin/time -f "%e s" $PY -m distributed_resnet.train $COMMON --num-workers $1 --seed $2 --name det_w$1_s$2 > /work/det-runs/det_w$1_s$2.log 2>&1
done
$RAYBIN stop --force
echo ALLDONE
