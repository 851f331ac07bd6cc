import torch

from distributed_resnet.augment import random_flip_shift, shift_images, to_float


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


def test_random_batch_keeps_dtype_layout_and_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = random_flip_shift(x_cl, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    # Every image is a flip/shift of itself: its rows are rows of the original (or their mirror), clamped.
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert changed > 0.8  # 7 x 7 shifts x 2 flips: 1/98 chance of identity
    # Each output pixel value exists in the same image and channel of the input.
    for i in range(4):
        assert set(out[i, 0].unique().tolist()) <= set(x[i, 0].unique().tolist())
    # About half the images are mirrored: check with shifts forced to zero.
    flips = random_flip_shift(x, max_shift=0, generator=g)
    mirrored = (flips == x.flip(3)).flatten(1).all(1).float().mean().item()
    assert 0.35 < mirrored < 0.65


def test_to_float_scales_to_unit_interval():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8)
    torch.testing.assert_close(to_float(x), torch.tensor([0.0, 1.0, 0.2]))
