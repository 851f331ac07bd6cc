import pickle
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_resnet.errors import UserError
from distributed_resnet.data import _write_cache, find_source, load_arrays, load_cifar10, stratified_split


def write_pickles(folder, n_train=50, n_test=20, seed=0, labels_max=9, protocol=pickle.DEFAULT_PROTOCOL):
    """A tiny torchvision-style cifar-10-batches-py: data_batch_1..5 and test_batch."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % (labels_max + 1)).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f, protocol=protocol)
        batches[name] = (data, labels)
    return batches


def test_reads_hf_parquet_mini(mini_dir):
    train, test, source = load_arrays(mini_dir)
    assert train.images.shape == (2000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (500, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [200] * 10
    assert np.bincount(test.labels).tolist() == [50] * 10


def test_parent_folder_with_plain_text_is_found(cifar_root):
    fmt, train, test = find_source(str(cifar_root))
    assert fmt == "parquet" and train[0].endswith("plain_text/train-00000-of-00001.parquet")


def test_second_load_is_cached_and_fast(mini_dir, private_cache):
    load_arrays(mini_dir)
    t0 = time.perf_counter()
    train, test, _ = load_arrays(mini_dir)
    assert time.perf_counter() - t0 < 2.0
    assert isinstance(train.images, np.memmap)  # read from the cache, not decoded again
    assert any(private_cache.iterdir())


def test_a_cache_another_run_wrote_first_is_kept_quietly(mini_dir, tmp_path):
    """Two runs started together race to cache the same decode: the second keeps the first's and leaves no
    half-written copy behind (it used to warn and leak a .tmp folder of the whole data set)."""
    train, test, _ = load_arrays(mini_dir)
    folder = tmp_path / "cache_key"
    _write_cache(folder, train, test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _write_cache(folder, train, test)
    assert [p.name for p in tmp_path.iterdir()] == ["cache_key"]
    assert np.array_equal(np.load(folder / "train_labels.npy"), train.labels)


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: as the original batches (Python 2's cPickle); 5: numpy's buffers
def test_reads_torchvision_pickles(tmp_path, protocol):
    batches = write_pickles(tmp_path / "cifar-10-batches-py", protocol=protocol)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train, test, _ = load_arrays(str(where))
        assert train.images.shape == (50, 32, 32, 3) and test.images.shape == (20, 32, 32, 3)
    first = batches["data_batch_1"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW rows -> HWC
    assert np.array_equal(train.images[0], first)
    assert train.labels.tolist()[:10] == list(range(10))


class RunsCode:
    """What a tampered pickle holds: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_tampered_pickle_batch_runs_nothing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickles(folder)
    marker = tmp_path / "it_ran"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": RunsCode(f"touch {marker}")}, f, protocol=2)
    assert pickle.loads(pickle.dumps(RunsCode("true"))) == 0  # plain pickle would run it
    with pytest.raises(UserError, match=r"data_batch_3 holds posix\.system, which is not part of the format") as e:
        load_arrays(str(folder))
    assert "\n" not in str(e.value) and not marker.exists()


def test_both_formats_give_identical_arrays(tmp_path, mini_dir):
    """Write the mini Parquet set out as pickles: the two readers must agree pixel for pixel."""
    train, test, _ = load_arrays(mini_dir)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    chunks = np.array_split(np.arange(len(train)), 5)
    for i, idx in enumerate(chunks, 1):
        data = train.images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": train.labels[idx].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test.images.transpose(0, 3, 1, 2).reshape(len(test), -1), "labels": test.labels.tolist()}, f)
    train2, test2, _ = load_arrays(str(tmp_path))
    assert np.array_equal(train2.images, train.images) and np.array_equal(test2.labels, test.labels)


def test_missing_data_set_names_path_and_fix(tmp_path):
    with pytest.raises(UserError, match=r"no CIFAR-10 found in .*--download"):
        load_arrays(str(tmp_path / "nowhere"))


def test_corrupt_parquet_is_a_user_error(tmp_path):
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot read .*train-00000-of-00001.parquet"):
        load_arrays(str(tmp_path))


def test_undecodable_png_is_a_user_error(tmp_path):
    table = pa.table({"img": [{"bytes": b"\x89PNG broken", "path": None}], "label": [3]})
    pq.write_table(table, tmp_path / "train-0.parquet")
    pq.write_table(table, tmp_path / "test-0.parquet")
    with pytest.raises(UserError, match="does not decode"):
        load_arrays(str(tmp_path))


def test_wrong_labels_are_refused(tmp_path):
    write_pickles(tmp_path / "cifar-10-batches-py", labels_max=11)
    with pytest.raises(UserError, match="outside 0..9"):
        load_arrays(str(tmp_path))


def test_wrong_image_size_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickles(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3 * 28 * 28), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(UserError, match="cannot read CIFAR-10 batch"):
        load_arrays(str(tmp_path))


def test_stratified_split_is_balanced_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    keep, held = stratified_split(labels, 150, seed=3)
    assert len(held) == 150 and len(keep) == 850 and not set(keep) & set(held)
    counts = np.bincount(labels[held])
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(held, stratified_split(labels, 150, seed=3)[1])
    assert not np.array_equal(held, stratified_split(labels, 150, seed=4)[1])


def test_validation_split_defaults_to_ten_percent(mini_dir):
    data = load_cifar10(mini_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (1800, 200, 500)
    assert np.bincount(data.val.labels).tolist() == [20] * 10
    assert not data.val_is_test


def test_val_size_zero_validates_on_test_with_warning(mini_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_cifar10(mini_dir, val_size=0)
    assert data.val_is_test and len(data.train) == 2000 and data.val is data.test
    assert any("optimistic" in str(w.message) for w in caught)


def test_max_train_and_test_samples_and_too_large_val(mini_dir):
    assert len(load_cifar10(mini_dir, val_size=100, max_train_samples=300).train) == 300
    whole, capped = load_cifar10(mini_dir).test, load_cifar10(mini_dir, max_test_samples=120).test
    assert len(capped) == 120 and np.array_equal(capped.images, whole.images[:120])  # the first 120, as stored
    with pytest.raises(UserError, match="--val-size 2000 leaves no training images"):
        load_cifar10(mini_dir, val_size=2000)
