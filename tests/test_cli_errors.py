"""Bad input: exit code 2 and exactly one line on stderr, no traceback."""

import pytest

from conftest import run_cli


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0]


@pytest.mark.parametrize("args,fragment", [
    (["--depth", "21"], "--depth 21 is not 6n+2"),
    (["--epochs", "-3"], "--epochs must be a positive integer"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--lr-policy", "nope"], "invalid choice"),
    (["--batch-size", "2", "--num-workers", "3"], "every worker needs at least one per step"),
    (["--gpu", "--gpus-per-worker", "0.5", "--num-workers", "2"], "would share one GPU, which NCCL refuses"),
    (["--gpu", "--gpus-per-worker", "0"], "--gpus-per-worker must be in (0, 8]"),
    # without --gpu the run takes GPUs where the cluster has them: the same checks, before any work
    (["--gpus-per-worker", "0.5", "--num-workers", "2"], "would share one GPU, which NCCL refuses"),
])
def test_bad_flags(args, fragment, tmp_path):
    _one_line_error(run_cli("train", *args, "--storage-path", str(tmp_path)), fragment)


def test_missing_data_set(tmp_path):
    proc = run_cli("train", "--data-dir", str(tmp_path / "empty"), "--storage-path", str(tmp_path), "--name", "x")
    _one_line_error(proc, "no CIFAR-10 found in", "--download")


def test_existing_run_folder_needs_resume(tmp_path, mini_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.json").write_text("{}")
    proc = run_cli("train", "--data-dir", mini_dir, "--storage-path", str(tmp_path), "--name", "taken")
    _one_line_error(proc, "already exists", "--resume")
    assert (tmp_path / "taken" / "results.json").read_text() == "{}"  # nothing lost


def test_resume_without_a_run(tmp_path, mini_dir):
    proc = run_cli("train", "--data-dir", mini_dir, "--storage-path", str(tmp_path), "--name", "new", "--resume")
    _one_line_error(proc, "nothing to resume")


def test_unwritable_storage_is_reported_before_training(tmp_path, mini_dir):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proc = run_cli("train", "--data-dir", mini_dir, "--storage-path", str(blocker / "runs"), "--name", "x")
    _one_line_error(proc, "cannot write to storage path")


def test_evaluate_bad_checkpoint(tmp_path, mini_dir):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    _one_line_error(run_cli("evaluate", "--checkpoint", str(tmp_path), "--data-dir", mini_dir), "not a readable checkpoint")
    _one_line_error(run_cli("evaluate", "--checkpoint", str(tmp_path / "none"), "--data-dir", mini_dir), "no checkpoint at")


def test_gpu_in_local_mode_without_a_gpu(tmp_path, mini_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli("train", "--num-workers", "0", "--gpu", "--data-dir", mini_dir, "--storage-path", str(tmp_path))
    _one_line_error(proc, "no CUDA GPU")


def test_a_last_batch_smaller_than_the_workers_is_refused_before_ray_starts(tmp_path, mini_dir):
    """129 images in batches of 128 leave 1 image for the last step: 2 workers cannot share it."""
    proc = run_cli("train", "--num-workers", "2", "--max-train-samples", "129", "--data-dir", mini_dir,
                   "--storage-path", str(tmp_path), "--name", "x")
    _one_line_error(proc, "the last batch of an epoch has 1 image(s), fewer than --num-workers 2")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--train-sizes", "16,40", "takes sides of 8 to 32 px, comma-separated (e.g. 16,24), got '16,40'"),
    ("--packed", "1,4", "takes run counts of 2 to 16, comma-separated (e.g. 2,4), got '1,4'"),
])
def test_bench_refuses_rows_it_cannot_time(capsys, flag, value, message):
    from distributed_resnet import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"argument {flag}: {message}" in err
