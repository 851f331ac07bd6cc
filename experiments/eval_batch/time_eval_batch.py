"""Time fp32 evaluation of the 10,000 test images at several batch sizes, with a published model, and check that the
logits do not depend on the batch. Run from the repository root:
    CIFAR10_DIR=../shared/cifar10 python experiments/eval_batch/time_eval_batch.py > experiments/eval_batch/time_eval_batch.log
"""
import os
import platform
import time

import torch

from distributed_resnet.data import load_arrays
from distributed_resnet.evaluate import load_model
from distributed_resnet.inference import images_to_tensor, predict

_, test, _ = load_arrays(os.environ.get("CIFAR10_DIR", "../shared/cifar10"))
images = images_to_tensor(test.images, "cpu", channels_last=False)
print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
for run in ("results/resnet20v1_fast", "results/resnet20v1"):
    model, _ = load_model(run)
    predict(model, images[:2000], 1000)  # warm-up
    reference = None
    for batch in (1000, 512, 256, 128, 64, 1000, 256):
        t0 = time.perf_counter()
        logits = predict(model, images, batch)
        seconds = time.perf_counter() - t0
        reference = logits if reference is None else reference
        print(f"{run} batch {batch:4d}: {seconds:5.1f} s, {len(images) / seconds:5.0f} images/s, "
              f"logits equal to batch 1000's: {torch.equal(logits, reference)}", flush=True)
