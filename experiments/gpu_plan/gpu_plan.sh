#!/usr/bin/env bash
# The GPU plan: one device call of at most 9 minutes, the most valuable part first, each part writing its results
# under $OUT as it ends, and each skipped when what is left of the budget cannot hold it.
#   1. the graph-safe step captured as a CUDA graph against the eager step (smoke_graph.py, ~20 s);
#   2. the 200-epoch reference recipe under its own protocol (--val-size 0), alone on the GPU, with --cuda-graph on
#      if step 1 passed (its epochs' images/s are the Ray Train path's at batch 128), stopped with Ctrl-C (SIGINT)
#      after 270 s (the target is 200 epochs in under 5 minutes);
#   3. bench --device cuda at batch 128 with 2 and 4 runs packed on the GPU (--packed 2,4), then at 512 (the
#      rehearsal: 128 with --packed 2, and 256);
#   4. the same 200-epoch recipe on the default split (45,000 train / 5,000 val), for what is left;
#   5. if time is left, the full-length sweep with its confirmation (tune_configs/lr_plateau_full.yaml, 8 trials
#      sharing the GPU, --cuda-graph on in every trial if step 1 passed).
# A run or the sweep that the deadline stops continues with the same command plus --resume.
# On the device machine, after ../shared/tools/device-stage's calls (it stages Ray and the data):
#   source .device-stage/pN/unpack.sh && bash experiments/gpu_plan/gpu_plan.sh
# Rehearsal on a CPU at a tiny size (the same commands, 2 epochs of 512 images, the mini set):
#   TINY=1 BUDGET=800 OUT=/tmp/plan CIFAR10_DIR=../shared/cifar10 bash experiments/gpu_plan/gpu_plan.sh
set -u
OUT=${OUT:?set OUT}; DATA=${CIFAR10_DIR:?set CIFAR10_DIR}; BUDGET=${BUDGET:-510}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ "${TINY:-0}" = 1 ]; then
  DEV=cpu; EPOCHS=2; SMALL=(--max-train-samples 512 --max-test-samples 256); PLACE=(--no-gpu --cpus-per-worker 1)
  BENCH=(--device cpu --quick --data-dir "$DATA/mini" --workers 1); BATCHES="128 256"; RUN_S=120; PACKED=2
  SWEEP=(--data-dir "$DATA/mini" --fast-dev-run --gpus-per-worker 0 --max-concurrent-trials 2)
else
  DEV=cuda; EPOCHS=200; SMALL=(); PLACE=(--gpu --gpus-per-worker 1)
  BENCH=(--device cuda --data-dir "$DATA"); BATCHES="128 512"; PACKED=2,4
  SWEEP=(--data-dir "$DATA" --cpus-per-worker 1 --gpus-per-worker 0.125 --max-concurrent-trials 8)
  RUN_S=270
fi
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
log() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/plan.log"; }
log "plan on $DEV, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET} s"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

rm -f "$OUT/smoke.json"
timeout 150 python experiments/gpu_plan/smoke_graph.py --device $DEV --data-dir "$DATA" --output "$OUT/smoke.json" \
  > "$OUT/smoke.log" 2>&1
log "1. smoke: exit $?; $(tail -1 "$OUT/smoke.log")"
GRAPH=off
python -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['passed'] else 1)" "$OUT/smoke.json" \
  2>/dev/null && GRAPH=on

# A 200-epoch run of the reference recipe, stopped with Ctrl-C (SIGINT) after $2 seconds: its checkpoints continue
# with the same command plus --resume.
reference_run() {
  local VAL=(); [ "$1" = protocol ] && VAL=(--val-size 0)
  timeout -s INT -k 30 "$2" python -m distributed_resnet.train --num-workers 1 "${PLACE[@]}" --cuda-graph $GRAPH \
    --epochs $EPOCHS ${VAL[@]+"${VAL[@]}"} ${SMALL[@]+"${SMALL[@]}"} --data-dir "$DATA" \
    --storage-path "$OUT/runs" --name "ref200_$1" > "$OUT/ref200_$1.log" 2>&1
  log "$3 200-epoch run, $1 (--cuda-graph $GRAPH): exit $?; $(grep -h -E '^finished|^interrupted' "$OUT/ref200_$1.log")"
}

if [ "$(left)" -gt $(( RUN_S + 30 )) ]; then reference_run protocol $RUN_S 2.; else log "2. skipped: $(left) s left"; fi

for batch in $BATCHES; do
  if [ "$(left)" -gt 100 ]; then
    MORE=(); [ "$batch" = "${BATCHES%% *}" ] && MORE=(--packed $PACKED)
    timeout $(( $(left) - 10 )) python -m distributed_resnet.bench "${BENCH[@]}" --batch-size $batch \
      ${MORE[@]+"${MORE[@]}"} --output "$OUT/bench_$batch.json" > "$OUT/bench_$batch.log" 2>&1
    log "3. bench batch $batch: exit $?"
  else
    log "3. bench batch $batch skipped: $(left) s left"
  fi
done

if [ "$(left)" -gt 90 ]; then reference_run default $(( $(left) - 60 )) 4.; else log "4. skipped: $(left) s left"; fi

if [ "$(left)" -gt 120 ]; then
  # The sweep's file, with --cuda-graph on in every trial if the smoke test passed (a copy: the YAML stays as it is).
  python -c "import sys, yaml; spec = yaml.safe_load(open(sys.argv[1])); spec['fixed']['cuda_graph'] = sys.argv[2];
yaml.safe_dump(spec, open(sys.argv[3], 'w'), sort_keys=False)" tune_configs/lr_plateau_full.yaml $GRAPH "$OUT/sweep.yaml"
  timeout -s INT -k 30 $(( $(left) - 40 )) python -m distributed_resnet.tune --config "$OUT/sweep.yaml" "${SWEEP[@]}" \
    --storage-path "$OUT/sweeps" --name lr_plateau_full > "$OUT/sweep.log" 2>&1
  log "5. sweep (--cuda-graph $GRAPH): exit $? (124: stopped at the deadline; continue with the same command plus --resume); $(tail -1 "$OUT/sweep.log")"
else
  log "5. sweep skipped: $(left) s left"
fi
log "done"
