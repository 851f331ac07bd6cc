"""ResNet v1 and v2 for CIFAR-10, layer for layer as in the Keras reference (`examples/cifar10_resnet.py`).

Pure PyTorch, no Ray. With Keras weights copied in (`convert.py`) it computes the Keras model's outputs
(`tests/test_keras_equivalence.py`). Conventions that differ without changing the function:
- the model returns logits; softmax lives in the loss (`F.cross_entropy` with one-hot targets is exactly
  softmax + categorical cross-entropy) and in `predict_proba`;
- convolutions pad like TensorFlow's `padding='same'` (default): a 3x3 stride-2 conv on a 32x32 map pads
  only the bottom and right. `padding="symmetric"` is PyTorch's convention (1 pixel on each side);
- BatchNorm keeps Keras' settings (momentum 0.99 -> PyTorch momentum 0.01, epsilon 1e-3) and, like Keras, folds
  the biased batch variance into its moving variance; in training it normalizes over the whole global batch
  across workers (`batchnorm.py`).
The L2 penalty on conv kernels is applied by the optimizer (see `param_groups`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from . import deterministic
from .batchnorm import BatchNorm2d

NUM_CLASSES = 10


PADDINGS = ("same", "symmetric")


class Conv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding (`same=True`): total padding (ceil(n/s)-1)*s + k - n, the odd pixel
    after; or PyTorch's symmetric k // 2 on each side (`same=False`).

    Where 'same' is symmetric (every stride-1 conv, every 1x1 conv here) the conv pads by itself; only a
    stride-2 3x3 conv on an even map pads its far side explicitly, one cheap `F.pad`. With `exact` set
    (`--deterministic`), the weight and bias gradients are sums that do not depend on the split (`deterministic.py`).
    """

    exact = None  # a deterministic.ExactGradients, set by deterministic.enable

    def __init__(self, *args, same: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:
            return self._conv(x, self.padding)
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):  # W, then H
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return self._conv(x, (pads[2], pads[0]))
        return self._conv(F.pad(x, pads), (0, 0))

    def _conv(self, x: torch.Tensor, padding) -> torch.Tensor:
        if self.exact is not None and self.training:
            return deterministic.conv2d(x, self, self.stride, padding)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding)


class Linear(nn.Linear):
    """nn.Linear; with `exact` set (`--deterministic`), its gradients do not depend on the split (`deterministic.py`)."""

    exact = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact is not None and self.training:
            return deterministic.linear(x, self)
        return super().forward(x)


class ResnetLayer(nn.Module):
    """Keras `resnet_layer`: Conv2D -> BN -> ReLU (`conv_first=True`), or BN -> ReLU -> Conv2D (v2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 activation: bool = True, batch_norm: bool = True, conv_first: bool = True, padding: str = "same"):
        super().__init__()
        self.conv = Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=True,
                           same=padding == "same")
        self.conv_first = conv_first
        bn_ch = out_ch if conv_first else in_ch
        self.bn = BatchNorm2d(bn_ch, eps=1e-3, momentum=0.01) if batch_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_first:
            return self.act(self.bn(self.conv(x)))
        return self.conv(self.act(self.bn(x)))


class BasicBlock(nn.Module):
    """v1 block: two 3x3 layers; at a stage's first block a 1x1 strided conv (no BN) projects the shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, padding: str = "same"):
        super().__init__()
        self.conv1 = ResnetLayer(in_ch, out_ch, stride=stride, padding=padding)
        self.conv2 = ResnetLayer(out_ch, out_ch, activation=False, padding=padding)
        self.shortcut = (ResnetLayer(in_ch, out_ch, kernel_size=1, stride=stride, activation=False, batch_norm=False,
                                     padding=padding)
                         if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.conv2(self.conv1(x)))


class BottleneckBlock(nn.Module):
    """v2 block: pre-activation 1x1 -> 3x3 -> 1x1; no ReLU after the addition (He et al. 2016b)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, first_of_net: bool, padding: str = "same"):
        super().__init__()
        # The net's very first block skips BN-ReLU: the stem just applied them.
        self.conv1 = ResnetLayer(in_ch, mid_ch, kernel_size=1, stride=stride, conv_first=False,
                                 activation=not first_of_net, batch_norm=not first_of_net, padding=padding)
        self.conv2 = ResnetLayer(mid_ch, mid_ch, conv_first=False, padding=padding)
        self.conv3 = ResnetLayer(mid_ch, out_ch, kernel_size=1, conv_first=False, padding=padding)
        self.shortcut = (ResnetLayer(in_ch, out_ch, kernel_size=1, stride=stride, activation=False, batch_norm=False,
                                     padding=padding)
                         if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv3(self.conv2(self.conv1(x)))


class ResNet(nn.Module):
    """ResNet v1 (depth 6n+2, 16/32/64 filters) or v2 (depth 9n+2, pre-activation bottlenecks 16/64/128 wide with
    outputs 64/128/256)."""

    def __init__(self, depth: int = 20, version: int = 1, num_classes: int = NUM_CLASSES, padding: str = "same",
                 bn_momentum: float = 0.01):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.depth, self.version, self.padding = depth, version, padding
        blocks: list[nn.Module] = []
        if version == 1:
            if (depth - 2) % 6:
                raise ValueError(f"ResNet v1 depth must be 6n+2, got {depth}")
            n = (depth - 2) // 6
            self.stem = ResnetLayer(3, 16, padding=padding)
            in_ch = 16
            for stage, out_ch in enumerate((16, 32, 64)):
                for b in range(n):
                    stride = 2 if stage > 0 and b == 0 else 1
                    blocks.append(BasicBlock(in_ch, out_ch, stride, padding))
                    in_ch = out_ch
        elif version == 2:
            if (depth - 2) % 9:
                raise ValueError(f"ResNet v2 depth must be 9n+2, got {depth}")
            n = (depth - 2) // 9
            self.stem = ResnetLayer(3, 16, padding=padding)
            in_ch = mid_ch = 16
            for stage in range(3):
                # Keras: num_filters_out = num_filters_in * 4 (stage 0) or * 2, and num_filters_in = num_filters_out
                # after each stage: bottleneck widths 16, 64, 128; outputs 64, 128, 256.
                out_ch = mid_ch * (4 if stage == 0 else 2)
                for b in range(n):
                    stride = 2 if stage > 0 and b == 0 else 1
                    blocks.append(BottleneckBlock(in_ch, mid_ch, out_ch, stride, stage == 0 and b == 0, padding))
                    in_ch = out_ch
                mid_ch = out_ch
        else:
            raise ValueError(f"version must be 1 or 2, got {version}")
        self.blocks = nn.Sequential(*blocks)  # registered in Keras' creation order: stem, blocks, head, fc
        self.head_norm = (nn.Sequential(BatchNorm2d(in_ch, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))
                          if version == 2 else nn.Identity())
        self.fc = Linear(in_ch, num_classes)
        for m in self.modules():  # the running statistics' update rate (0.01: Keras' momentum 0.99)
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras' he_normal: truncated normal (2 sigma), std sqrt(2 / fan_in) / 0.8796; biases zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_norm(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # AveragePooling2D(8) on 8x8 maps

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(x), dim=1)


def param_groups(model: nn.Module, weight_decay: float, on: str = "conv") -> list[dict]:
    """Split parameters so that only conv kernels carry the L2 penalty, as Keras' kernel_regularizer does
    (`on="weights"`: the dense layer's weight too; never BatchNorm or biases).

    Keras adds `weight_decay * sum(w**2)` to the loss, whose gradient is `2 * weight_decay * w`. Adam's
    `weight_decay` argument adds `wd * w` to the gradient before the moment updates (coupled L2, not AdamW),
    so `wd = 2 * weight_decay` on the conv kernels gives exactly the reference's gradient, without computing
    the penalty every step (SGD's weight_decay is the same coupled term). `tests/test_model.py` checks the two are equal.
    """
    decayed = (nn.Conv2d,) if on == "conv" else (nn.Conv2d, nn.Linear)
    kernels = [m.weight for m in model.modules() if isinstance(m, decayed)]
    kernel_ids = {id(p) for p in kernels}
    rest = [p for p in model.parameters() if id(p) not in kernel_ids]
    return [{"params": kernels, "weight_decay": 2 * weight_decay}, {"params": rest, "weight_decay": 0.0}]


def l2_penalty(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """The reference's regularisation loss term (for tests and reporting; training uses `param_groups`)."""
    return weight_decay * sum((m.weight ** 2).sum() for m in model.modules() if isinstance(m, nn.Conv2d))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
