import torch

from distributed_resnet.augment import random_flip_shift, resize, shift_images, to_float


def _img(n=2, c=3, h=32, w=32):
    return torch.arange(n * c * h * w, dtype=torch.int64).reshape(n, c, h, w)


def test_shift_right_repeats_left_edge():
    x = _img(1)
    out = shift_images(x, torch.tensor([[0]]), torch.tensor([[2]]), torch.tensor([[False]]))
    assert torch.equal(out[..., 2:], x[..., :-2])
    assert torch.equal(out[..., 0], x[..., 0]) and torch.equal(out[..., 1], x[..., 0])  # nearest fill


def test_shift_up_repeats_bottom_edge():
    x = _img(1)
    out = shift_images(x, torch.tensor([[-3]]), torch.tensor([[0]]), torch.tensor([[False]]))
    assert torch.equal(out[:, :, :-3], x[:, :, 3:])
    for r in (29, 30, 31):
        assert torch.equal(out[:, :, r], x[:, :, 31])


def test_flip_mirrors_columns_and_shift_applies_after():
    x = _img(1)
    flipped = shift_images(x, torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[True]]))
    assert torch.equal(flipped, x.flip(3))
    both = shift_images(x, torch.tensor([[1]]), torch.tensor([[1]]), torch.tensor([[True]]))
    expected = shift_images(x, torch.tensor([[1]]), torch.tensor([[1]]), torch.tensor([[False]])).flip(3)
    assert torch.equal(both, expected)  # Keras: shift, then flip the result


def test_zero_shift_no_flip_is_identity_per_image():
    x = _img(3)
    out = shift_images(x, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long),
                       torch.zeros(3, 1, dtype=torch.bool))
    assert torch.equal(out, x)


def test_random_pixel_shift_keeps_dtype_layout_and_pixels():
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = random_flip_shift(x_cl, "pixel", generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)  # no re-layout before the first conv
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert changed > 0.8  # 7 x 7 shifts x 2 flips: 1/98 chance of identity
    # Each output pixel value exists in the same image and channel of the input.
    for i in range(4):
        assert set(out[i, 0].unique().tolist()) <= set(x[i, 0].unique().tolist())


def test_random_bilinear_shift_draws_keras_ranges():
    """Shifts uniform in [-3.2, 3.2] px per axis (10% of 32), flips with probability 1/2, layout kept."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    ramp = torch.arange(32, dtype=torch.float32)
    # Rows hold their row index, columns their column index: the output's interior reveals the drawn shifts.
    rows = ramp.view(1, 1, 32, 1).expand(n, 1, 32, 32)
    cols = ramp.view(1, 1, 1, 32).expand(n, 1, 32, 32)
    x = torch.cat([rows, cols, torch.zeros(n, 1, 32, 32)], 1).contiguous(memory_format=torch.channels_last)
    out = random_flip_shift(x, "bilinear", generator=g)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    dy = 16 - out[:, 0, 16, 16]  # output (16, 16) samples row 16 - dy
    col = out[:, 1, 16, 16]
    flipped = (out[:, 1, 16, 20] < out[:, 1, 16, 12])
    dx = torch.where(flipped, (31 - 16) - col, 16 - col)
    for d in (dy, dx):
        assert d.abs().max() <= 3.2 + 1e-5 and d.abs().max() > 3.1
        assert abs(d.mean()) < 0.1 and abs(d.std() - 3.2 / 3 ** 0.5) < 0.1  # uniform: std = 3.2 / sqrt(3)
        assert (d - d.round()).abs().mean() > 0.2  # continuous, not whole pixels
    assert 0.45 < flipped.float().mean() < 0.55


def test_fractional_shift_interpolates_between_neighbours():
    x = torch.rand(1, 3, 32, 32)
    half = shift_images(x, torch.tensor([[0.0]]), torch.tensor([[0.5]]), torch.tensor([[False]]))
    torch.testing.assert_close(half[..., 1:], (x[..., 1:] + x[..., :-1]) / 2)
    torch.testing.assert_close(half[..., 0], x[..., 0])  # beyond the edge: nearest fill
    whole = shift_images(x, torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([[True]]))
    exact = shift_images(x, torch.tensor([[2]]), torch.tensor([[-1]]), torch.tensor([[True]]))
    torch.testing.assert_close(whole, exact, rtol=0, atol=0)  # integral float shifts are exact gathers


def test_to_float_scales_to_unit_interval():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8)
    torch.testing.assert_close(to_float(x), torch.tensor([0.0, 1.0, 0.2]))


def test_augmentation_builds_no_tensor_from_host_data():
    """A tensor made from Python values (`torch.tensor([...], device=...)`, seen by the dispatcher as lift_fresh) is a
    blocking host-to-device copy on CUDA every step, and cannot be captured in a CUDA graph: only device-side ops."""
    from dispatch_ops import OpsSeen

    x = torch.rand(8, 3, 32, 32)
    for shift in ("bilinear", "pixel"):
        with OpsSeen() as ops:
            random_flip_shift(x, shift, generator=torch.Generator().manual_seed(0))
        assert "aten.rand.generator" in ops.seen  # the recorder sees the augmentation's ops
        assert not {op for op in ops.seen if "lift_fresh" in op}, shift


def test_bilinear_shifts_are_the_uniform_draws_scaled():
    """The shifts are U[-3.2, 3.2] px per axis, the same numbers as before the device-side rewrite."""
    gen = torch.Generator().manual_seed(3)
    flip = torch.rand((64, 1), generator=gen) < 0.5  # drawn first, then both shifts
    u = torch.rand((64, 2), generator=gen) * 2 - 1
    dy, dx = (u * torch.tensor([[3.2, 3.2]])).split(1, dim=1)
    x = torch.rand(64, 3, 32, 32)
    assert torch.equal(random_flip_shift(x, "bilinear", generator=torch.Generator().manual_seed(3)),
                       shift_images(x, dy, dx, flip))


def test_alternate_flip_mirrors_each_image_in_every_other_epoch():
    """`--flip alternate` through the training loop: with shifts of 0 px, each image of the epoch reaches the model
    mirrored as `first_flips` says in epoch 1, and the other way in epoch 2 and the same way again in epoch 3."""
    from distributed_resnet.augment import alternating_flips
    from distributed_resnet.inference import images_to_tensor
    from distributed_resnet.worker import Augment, EpochPlan, train_epoch

    n = 40
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    train = images_to_tensor(images.numpy(), "cpu", False), torch.randint(0, 10, (n,))
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 10)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.head(x.mean((1, 2, 3)).unsqueeze(1))

    net = Recorder()
    first = alternating_flips(n, 3, "cpu")
    assert 0 < int(first.sum()) < n and torch.equal(first, alternating_flips(n, 3, "cpu"))  # a coin per image, seeded
    originals = to_float(train[0])
    mirrored = {}
    for epoch in range(3):
        seen.clear()
        plan = EpochPlan(n, 16, 1, 0, 5, epoch)
        train_epoch(net, torch.optim.SGD(net.parameters(), lr=0.0), train, plan, Augment("pixel", 0.0, first), False)
        batch = torch.cat(seen)
        order = plan.order
        for row, image in enumerate(order.tolist()):
            if torch.equal(batch[row], originals[image].flip(2)):
                mirrored[epoch, image] = True
            else:
                assert torch.equal(batch[row], originals[image])
                mirrored[epoch, image] = False
    for image in range(n):
        assert mirrored[0, image] == bool(first[image])
        assert mirrored[1, image] != mirrored[0, image] and mirrored[2, image] == mirrored[0, image]


def test_resize_averages_down_and_leaves_full_size_alone():
    """--progressive-resize: a 32 px batch at 16 px keeps each channel's mean (antialiased: every input pixel
    counts), keeps flat images flat and keeps channels_last; at None or 32 px the batch comes back as it was."""
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    small = resize(x, 16)
    assert small.shape == (4, 3, 16, 16)
    assert torch.allclose(small.mean((2, 3)), x.mean((2, 3)), atol=0.02)
    assert torch.allclose(resize(torch.full((1, 3, 32, 32), 0.25), 24), torch.tensor(0.25))
    assert resize(x, None) is x and resize(x, 32) is x
