import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed_resnet.model import BasicBlock, ResNet, ResnetLayer, count_parameters, l2_penalty, param_groups


def test_resnet20_v1_parameter_count_matches_keras():
    # Keras' model.summary() for ResNet20v1: 273,066 trainable parameters (274,442 with BN moving stats).
    assert count_parameters(ResNet(20, 1)) == 273_066


@pytest.mark.parametrize("depth,version,params", [(32, 1, 467_946), (56, 1, 857_706), (20, 2, 570_602), (56, 2, 1_663_338)])
def test_other_depths_build_and_count(depth, version, params):
    model = ResNet(depth, version)
    assert count_parameters(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_v1_structure_is_the_reference():
    model = ResNet(20, 1)
    blocks = list(model.blocks)
    assert len(blocks) == 9 and all(isinstance(b, BasicBlock) for b in blocks)
    widths = [b.conv2.conv.out_channels for b in blocks]
    assert widths == [16] * 3 + [32] * 3 + [64] * 3
    # Stage transitions: stride-2 3x3 conv, and a 1x1 stride-2 projection shortcut without BN.
    for i in (3, 6):
        assert blocks[i].conv1.conv.stride == (2, 2)
        sc = blocks[i].shortcut
        assert isinstance(sc, ResnetLayer) and sc.conv.kernel_size == (1, 1) and sc.conv.stride == (2, 2)
        assert isinstance(sc.bn, nn.Identity) and isinstance(sc.act, nn.Identity)
    assert all(isinstance(b.shortcut, nn.Identity) for i, b in enumerate(blocks) if i not in (3, 6))
    # The second layer of each block has no activation: ReLU comes after the addition.
    assert all(isinstance(b.conv2.act, nn.Identity) for b in blocks)
    # Keras BatchNormalization defaults: momentum 0.99, epsilon 1e-3.
    bn = model.stem.bn
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)


def test_conv_first_false_is_bn_relu_conv():
    layer = ResnetLayer(4, 8, conv_first=False).eval()
    x = torch.randn(2, 4, 6, 6)
    expected = layer.conv(F.relu(layer.bn(x)))
    torch.testing.assert_close(layer(x), expected)
    assert layer.bn.num_features == 4  # BN acts on the input channels


def test_he_normal_init_std():
    torch.manual_seed(0)
    model = ResNet(20, 1)
    conv = model.blocks[8].conv2.conv  # 64 x 64 x 3 x 3: fan_in 576
    std = conv.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert conv.weight.abs().max().item() <= 2 * math.sqrt(2 / 576) / 0.8796 + 1e-6  # truncated at 2 sigma
    assert torch.all(conv.bias == 0)


def test_invalid_depth_raises():
    with pytest.raises(ValueError):
        ResNet(21, 1)
    with pytest.raises(ValueError):
        ResNet(26, 2)


def test_l2_through_adam_equals_keras_loss_term():
    """Adam's coupled weight decay 2*wd on conv kernels == the gradient of the Keras loss term wd * sum(w^2)."""
    torch.manual_seed(0)
    a = ResNet(20, 1)
    b = ResNet(20, 1)
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(a(x), y).backward()
    (F.cross_entropy(b(x), y) + l2_penalty(b, 1e-4)).backward()
    groups = param_groups(a, 1e-4)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for pa, pb in zip(a.parameters(), b.parameters()):
        # What torch.optim.Adam feeds its moments: grad + weight_decay * param.
        torch.testing.assert_close(pa.grad + decay[id(pa)] * pa.detach(), pb.grad, rtol=1e-4, atol=1e-7)
    # And Adam really applies it that way: one step of each on the conv kernels agrees.
    kernels_a, kernels_b = groups[0]["params"], [m.weight for m in b.modules() if isinstance(m, nn.Conv2d)]
    opt_a = torch.optim.Adam([{"params": kernels_a, "weight_decay": 2e-4}], lr=1e-3)
    opt_b = torch.optim.Adam(kernels_b, lr=1e-3)
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(kernels_a, kernels_b):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)
    # The penalty is on conv kernels only (not biases, BN or the Dense layer).
    assert groups[0]["weight_decay"] == pytest.approx(2e-4) and groups[1]["weight_decay"] == 0
    assert len(groups[0]["params"]) == 19 + 2  # 19 3x3 convs + 2 projection shortcuts
