"""Probe: recompute BatchNorm running statistics over the training split (Precise BN) and compare val/test.

Ran as (stopped after the first two checkpoints; output in precise_bn.log):
  .venv/bin/python experiments/fast_recipe/h200/precise_bn/precise_bn.py /work/runs_h200/runs/{preset_s0,preset_s1,preset_s2,bs64_s0,bs64_s1,bs64_s2}/checkpoint_epoch_0030 \
      results/resnet20v1_fast
Each BatchNorm's momentum is set to 1/(n+1) before batch n, so its running mean and (biased) variance end as the
plain averages over the batches.
"""
import json, sys, time
import torch
from distributed_resnet.evaluate import load_model
from distributed_resnet.data import load_cifar10
from distributed_resnet.inference import images_to_tensor, predict
from distributed_resnet.augment import to_float, draw_flip_shift, shift_images
from distributed_resnet.model import ResNet
from torch import nn

torch.set_num_threads(2)
DATA = "/work/shared/cifar10"

def acc(model, images, labels):
    return float((predict(model, images, 1000).argmax(1) == labels).float().mean())

@torch.no_grad()
def recalibrate(model, images, batch, augment, seed):
    """Train-mode forwards over the training split; each BN's running stats = the plain average of the batches'."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    model.train()
    n = 0
    for i in range(0, len(images) - batch + 1, batch):
        for m in bns:
            m.momentum = 1.0 / (n + 1)
        x = to_float(images[order[i:i + batch]])
        if augment:
            dy, dx, flip = draw_flip_shift(batch, 32, 32, "pixel", x.device, g, 0.125)
            x = shift_images(x, dy, dx, flip)
        model(x)
        n += 1
    model.eval()
    return n

out = {}
for path in sys.argv[1:]:
    model, meta = load_model(path)
    seed = meta["config"]["seed"]
    data = load_cifar10(DATA, None, None, seed)
    tr = images_to_tensor(data.train.images, "cpu", False)
    va, te = images_to_tensor(data.val.images, "cpu", False), images_to_tensor(data.test.images, "cpu", False)
    yv, yt = torch.as_tensor(data.val.labels).long(), torch.as_tensor(data.test.labels).long()
    r = {"stored": (acc(model, va, yv), acc(model, te, yt))}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, aug in (("precise_aug", True), ("precise_plain", False)):
        model.load_state_dict(state)
        t = time.time(); nb = recalibrate(model, tr, 128, aug, 1234)
        r[name] = (acc(model, va, yv), acc(model, te, yt))
        r[name + "_s"] = round(time.time() - t, 1)
    out[path] = r
    print(path, json.dumps(r), flush=True)
json.dump(out, open("/work/probe/precise_bn.json", "w"), indent=1)
