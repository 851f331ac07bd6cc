"""`--deterministic`'s layers (deterministic.py) in one process: the gradients are the model's, and the cases the exact sums
cannot take fail loudly instead of computing something else. (N workers against one: test_parallel_and_fast_path.)"""

import pytest
import torch
from torch import nn

from distributed_resnet import deterministic
from distributed_resnet.model import Conv2d, ResNet


def _grads(model, x, y, exact_grads=None):
    model.zero_grad(set_to_none=True)
    if exact_grads is not None:
        exact_grads.begin_step(len(x))
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    (losses.sum() / len(x)).backward()
    if exact_grads is not None:
        exact_grads.reduce()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_exact_gradients_are_the_models_gradients(padding):
    """Against plain autograd in fp64: every weight gradient to fp32's resolution. (The conv biases before a
    BatchNorm have a true gradient of ~0, all rounding, and are left out.)"""
    torch.manual_seed(0)
    model = ResNet(depth=8, padding=padding)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    want = _grads(model.double(), x.double(), y)
    model = model.float()
    got = _grads(model, x, y, deterministic.enable(model))
    for name, g in got.items():
        if name.endswith("conv.bias") and "shortcut" not in name:
            continue
        rel = ((g.double() - want[name]).norm() / want[name].norm()).item()
        assert rel < 1e-4, (name, rel)


def test_a_share_of_one_image_and_an_in_place_op_after_a_conv():
    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, 1, padding=1, same=False)
    grads = deterministic.enable(conv)
    grads.begin_step(1)
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    torch.relu_(conv(x)).sum().backward()  # the output is no view: an in-place op on it is allowed
    grads.reduce()
    conv.exact = None
    x2 = x.detach().clone().requires_grad_()
    conv.weight.grad = None
    torch.relu_(conv(x2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_a_conv_used_twice_a_step_and_unsupported_convs_are_refused():
    conv = Conv2d(2, 2, 3, 1, padding=1, same=False)
    grads = deterministic.enable(conv)
    grads.begin_step(2)
    x = torch.rand(2, 2, 8, 8)
    with pytest.raises(ValueError, match="used twice"):
        conv(conv(x)).sum().backward()
    with pytest.raises(ValueError, match="groups, dilation"):
        deterministic.enable(Conv2d(4, 4, 3, 1, padding=1, same=False, groups=2))


def test_a_nan_gradient_stays_nan():
    conv = Conv2d(2, 2, 3, 1, padding=1, same=False)
    grads = deterministic.enable(conv)
    grads.begin_step(2)
    x = torch.rand(2, 2, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    conv(x).sum().backward()
    grads.reduce()
    assert torch.isnan(conv.weight.grad).any()
