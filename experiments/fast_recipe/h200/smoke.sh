#!/usr/bin/env bash
# Device call 1 on the H200 (see README.md): install the Ray wheels carried in .dstage/w, run the Ray Train GPU path
# for 2 epochs on the mini set, and measure how many training processes share the GPU.
set -u
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dstage/w/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L; nproc; python3 -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__, torch.cuda.get_device_name())'
timeout 150 python3 -m distributed_resnet.train --gpu --num-workers 1 --recipe fast --flip alternate --epochs 2 \
    --data-dir .dstage/w/mini --storage-path /tmp/runs --name smoke 2>&1 | tee "$OUT/smoke.log"
timeout 100 python3 experiments/fast_recipe/h200/gpu_share.py --procs 1 6 12 --batch 128 64 --steps 200 2>&1 | tee "$OUT/share.log"
