"""Device and precision choice, fp32 evaluation, and restoring Adam into another mode (fast <-> plain)."""

import io

import numpy as np
import pytest
import torch

from conftest import REPO
from distributed_resnet import checkpoint as ckpt
from distributed_resnet.augment import to_float
from distributed_resnet.errors import UserError
from distributed_resnet.device import cpu_has_native_bf16, local_device, use_bf16
from distributed_resnet.inference import predict
from distributed_resnet.model import ResNet, param_groups


def test_local_mode_device_follows_the_flags_not_ray():
    """--num-workers 0 picks its device from --gpu/--no-gpu and torch (Ray's get_device() ignores use_gpu there)."""
    assert local_device(False) == torch.device("cpu")
    if torch.cuda.is_available():
        assert local_device(None).type == "cuda" and local_device(True).type == "cuda"
    else:
        assert local_device(None) == torch.device("cpu")
        with pytest.raises(UserError, match="no CUDA GPU"):
            local_device(True)


def test_auto_precision_is_bf16_exactly_where_it_is_native():
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) == cpu_has_native_bf16()
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    if torch.cuda.is_available():  # on CUDA: exactly where the GPU has bf16 tensor cores (compute capability 8.0+)
        from distributed_resnet.device import cuda_has_native_bf16

        cuda = torch.device("cuda", 0)
        assert use_bf16("auto", cuda) == cuda_has_native_bf16(torch.cuda.get_device_capability(cuda))


def test_evaluation_is_fp32_whatever_the_training_precision():
    """Val loss drives ReduceLROnPlateau (min_delta 1e-4): no bf16 rounding in it."""
    torch.manual_seed(0)
    model = ResNet().to(memory_format=torch.channels_last).eval()
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels_last uint8
    logits = predict(model, images, batch=16)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        exact = model(to_float(images).contiguous())
    torch.testing.assert_close(logits, exact, rtol=1e-5, atol=1e-5)


def test_the_evaluation_batch_changes_the_speed_not_the_logits(cifar_root):
    """EVAL_BATCH (128) was chosen for speed: the published runs were evaluated at 1000, and re-evaluating them must
    give the same predictions (test_pretrained checks the counts on the whole test set). On the 2-core EPYC the
    logits were the same bits; other kernels may round differently, so: the same predictions, logits within 1e-4."""
    from distributed_resnet.config import EVAL_BATCH, TrainConfig
    from distributed_resnet.data import load_arrays
    from distributed_resnet.evaluate import load_model
    from distributed_resnet.inference import images_to_tensor

    assert TrainConfig().eval_batch_size == EVAL_BATCH == 128
    model, _ = load_model(str(REPO / "results" / "resnet20v1_fast"))
    _, test, _ = load_arrays(str(cifar_root / "mini"))
    images = images_to_tensor(test.images, "cpu", channels_last=False)  # 500 images: a last batch of 116
    small, large = predict(model, images, EVAL_BATCH), predict(model, images, 1000)
    assert torch.equal(small.argmax(1), large.argmax(1))
    torch.testing.assert_close(small, large, rtol=0, atol=1e-4)


def _make(fast: bool, init: dict | None = None):
    torch.manual_seed(0)
    model = ResNet()
    if init is not None:
        model.load_state_dict(init)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(param_groups(model, 1e-4), lr=1e-3, eps=1e-7, fused=fast or None)
    return model, opt


def _step(model, opt, grads):
    """One Adam step with given gradients (the same logical values in any layout): the optimizer alone is tested,
    without the rounding noise of conv-bias gradients under BatchNorm that Adam would amplify into full steps."""
    for p, g in zip(model.parameters(), grads):
        p.grad = torch.empty_like(p).copy_(g)
    opt.step()


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * 1e-2 for p in ResNet().parameters()]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("saved_fast,resumed_fast", [(True, False), (False, True)])
def test_adam_restores_into_the_other_mode(saved_fast, resumed_fast):
    """A checkpoint saved in one mode (channels_last + fused Adam, or NCHW + default Adam), resumed in the other,
    takes the same next step as a run that was in the second mode all along."""
    g1, g2 = _grads(1), _grads(2)
    init = ResNet().state_dict()
    saver, opt = _make(saved_fast, init)
    _step(saver, opt, g1)
    saved = _roundtrip({"model": saver.state_dict(), "optimizer": opt.state_dict()})

    resumed, opt_r = _make(resumed_fast)
    resumed.load_state_dict(saved["model"])
    ckpt.restore_optimizer(opt_r, saved["optimizer"], fused=resumed_fast)
    assert all(bool(g.get("fused")) == resumed_fast for g in opt_r.param_groups)
    _step(resumed, opt_r, g2)

    straight, opt_s = _make(resumed_fast, init)
    _step(straight, opt_s, g1)
    _step(straight, opt_s, g2)
    assert _max_diff(resumed, straight) < 1e-6

    # What the fix is for: a plain load_state_dict keeps the saver's flags and the moments' memory layout.
    naive, opt_n = _make(resumed_fast)
    naive.load_state_dict(saved["model"])
    opt_n.load_state_dict(saved["optimizer"])
    assert bool(opt_n.param_groups[0].get("fused")) != resumed_fast
    try:
        _step(naive, opt_n, g2)
    except RuntimeError:
        return  # a fused kernel refusing the mixed layouts is the other way it fails
    assert _max_diff(naive, straight) > 1e-4


def test_restore_keeps_adams_step_on_the_host_for_non_fused():
    model, opt = _make(False)
    _step(model, opt, _grads(1))
    saved = _roundtrip(opt.state_dict())
    model2, opt2 = _make(False)
    ckpt.restore_optimizer(opt2, saved, fused=False)
    steps = [s["step"] for s in opt2.state.values()]
    assert all(s.device.type == "cpu" and s.item() == 1 for s in steps)


def test_a_checkpoint_copy_cut_short_is_not_resumed_from(tmp_path):
    """Ray copies a checkpoint's files in parallel: a copy killed midway can leave meta.json whole beside a
    truncated checkpoint.pt. Resume and best-checkpoint choice must skip it, and loading it says so in one line."""
    model = ResNet(depth=8)
    for epoch in (1, 2):
        ckpt.save(tmp_path / ckpt.dir_name(epoch), {"model": model.state_dict(),
                                                      "meta": {"epoch": epoch, "metrics": {"val_accuracy": epoch}}})
    assert ckpt.latest_in(tmp_path).name == ckpt.dir_name(2) and ckpt.best_in(tmp_path).name == ckpt.dir_name(2)
    cut = tmp_path / ckpt.dir_name(2) / ckpt.STATE_FILE
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert ckpt.latest_in(tmp_path).name == ckpt.dir_name(1) and ckpt.best_in(tmp_path).name == ckpt.dir_name(1)
    with pytest.raises(UserError, match="truncated"):
        ckpt.load(cut.parent)


def test_bench_times_only_full_batches_of_real_images():
    from distributed_resnet.bench import step_budget

    assert step_budget(45_000, 128, 40, 5) == (40, 5)
    assert step_budget(45_000, 512, 300, 50) == (87 - 17, 17)  # 87 full batches: a shorter warm-up, then the rest
    for n in (45_000, 50_000):
        for b in (151, 256, 1024, 4096):
            steps, warmup = step_budget(n, b, 300, 50)
            assert steps >= 1 and warmup >= 1 and (steps + warmup) * b <= n, (n, b, steps, warmup)


def test_packed_runs_count_their_images_over_each_runs_own_steady_span():
    """bench --packed: a run's rate is its epochs after the first over the wall time they took (evaluation
    included), summed over the runs; the overlap says how long they all ran at once."""
    from distributed_resnet.bench import packed_rate

    def history(ends, images=1000, train_seconds=0.5):
        return [{"ended_at": end, "images_per_second": images / train_seconds, "train_seconds": train_seconds}
                for end in ends]

    together, overlap = packed_rate([history([10, 12, 14, 16]), history([11, 13, 15, 17])])
    assert together == pytest.approx(3000 / 6 + 3000 / 6) and overlap == pytest.approx(5 / 6)
    apart, overlap = packed_rate([history([0, 2, 4]), history([10, 12, 14])])
    assert apart == pytest.approx(2 * 2000 / 4) and overlap == 0.0  # one after the other: the sum overstates
    with pytest.raises(ValueError, match="at least 2 epochs"):
        packed_rate([history([1])])


def test_auto_bf16_on_cuda_needs_ampere_or_later():
    """T4 (7.5) and V100 (7.0) emulate bf16: auto stays fp32 there; A100 (8.0), A10G (8.6), H100 (9.0) use bf16."""
    from distributed_resnet.device import cuda_has_native_bf16

    assert [cuda_has_native_bf16(c) for c in ((6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0))] == \
        [False, False, False, True, True, True]


def test_evaluation_runs_without_tf32():
    """'fp32' evaluation is IEEE fp32: TF32 (on by default for cuDNN convolutions on Ampere+) is off while the
    loop predicts, and the previous settings come back after."""
    from distributed_resnet.inference import predict

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return torch.zeros(len(x), 10)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        predict(Probe(), torch.zeros(5, 3, 32, 32, dtype=torch.uint8), batch=2)
        assert seen == [(False, False)] * 3
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
