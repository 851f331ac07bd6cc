"""CIFAR-10 from disk to uint8 arrays, checked and cached. No Ray, no torch tensors.

Two layouts are read: the Hugging Face Parquet export (`train-*.parquet` / `test-*.parquet`, PNG bytes in
column `img`, as `../shared/cifar10`) and torchvision's `cifar-10-batches-py` pickles; `--download` fetches
the latter with torchvision. Decoding 60,000 PNGs takes a while, so the arrays are cached once as `.npy`
files (keyed by the source files' names, sizes and times) and later starts memory-map them.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IMAGE_SIDE, default_data_dir  # noqa: F401  (default_data_dir: re-exported for the commands)
from .errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, 3)


@dataclass
class Split:
    images: np.ndarray  # uint8, N x 32 x 32 x 3 (HWC, as stored)
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class Cifar10:
    train: Split
    val: Split
    test: Split
    source: str
    val_is_test: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("DISTRIBUTED_RESNET_CACHE", "~/.cache/distributed_resnet")).expanduser()


def find_source(data_dir: str) -> tuple[str, list[str], list[str]]:
    """Return (format, train files, test files) for the first layout found at or under `data_dir`."""
    root = Path(data_dir).expanduser()
    for folder in (root, root / "plain_text"):
        train, test = sorted(glob.glob(str(folder / "train-*.parquet"))), sorted(glob.glob(str(folder / "test-*.parquet")))
        if train and test:
            return "parquet", train, test
    for folder in (root, root / "cifar-10-batches-py"):
        train = [str(folder / f"data_batch_{i}") for i in range(1, 6)]
        if all(os.path.isfile(f) for f in train) and (folder / "test_batch").is_file():
            return "pickle", train, [str(folder / "test_batch")]
    raise UserError(
        f"no CIFAR-10 found in {root} (looked for train-*.parquet/test-*.parquet, plain_text/, cifar-10-batches-py/); "
        "pass --data-dir DIR, set CIFAR10_DIR, or add --download"
    )


def download(data_dir: str) -> None:
    """Fetch torchvision's `cifar-10-batches-py` into `data_dir` (163 MB, checked by torchvision's MD5)."""
    import torchvision

    try:
        for train in (True, False):
            torchvision.datasets.CIFAR10(root=os.path.expanduser(data_dir), train=train, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"could not download CIFAR-10 into {data_dir}: {e}; copy the data there and drop --download")


def load_arrays(data_dir: str, download_if_missing: bool = False) -> tuple[Split, Split, str]:
    """Full train and test splits as uint8 arrays, decoded once and then read from the cache."""
    try:
        fmt, train_files, test_files = find_source(data_dir)
    except UserError:
        if not download_if_missing:
            raise
        download(data_dir)
        fmt, train_files, test_files = find_source(data_dir)
    key = _cache_key(train_files + test_files)
    cached = cache_dir() / key
    try:
        splits = [Split(np.load(cached / f"{s}_images.npy", mmap_mode="r"), np.load(cached / f"{s}_labels.npy"))
                  for s in ("train", "test")]
        return splits[0], splits[1], os.path.dirname(train_files[0])
    except (OSError, ValueError):
        pass
    reader = _read_parquet if fmt == "parquet" else _read_pickles
    train, test = reader(train_files), reader(test_files)
    for name, split in (("train", train), ("test", test)):
        check_split(split, name, os.path.dirname(train_files[0]))
    _verify_manifest(train_files[0], train, test)
    _write_cache(cached, train, test)
    return train, test, os.path.dirname(train_files[0])


def load_cifar10(data_dir: str, val_size: int | None = None, max_train_samples: int | None = None,
                 seed: int = 0, download_if_missing: bool = False, max_test_samples: int | None = None) -> Cifar10:
    """Train/val/test: a stratified, seeded hold-out of `val_size` training images (default 10%). The caps keep a
    stratified subset of the training images and the first `max_test_samples` test images (quick runs)."""
    train, test, source = load_arrays(data_dir, download_if_missing)
    if val_size is None:
        val_size = len(train) // 10
    if val_size >= len(train):
        raise UserError(f"--val-size {val_size} leaves no training images ({len(train)} in {source}); use a smaller value")
    if val_size == 0:
        warnings.warn("--val-size 0: validating on the test set as the reference did; test accuracy is then optimistic")
        train_part, val, val_is_test = train, test, True
    else:
        train_idx, val_idx = stratified_split(train.labels, val_size, seed)
        train_part, val, val_is_test = train.take(train_idx), train.take(val_idx), False
    if max_train_samples is not None and max_train_samples < len(train_part):
        keep, _ = stratified_split(train_part.labels, len(train_part) - max_train_samples, seed + 1)
        train_part = train_part.take(keep)
    if max_test_samples is not None and max_test_samples < len(test):
        test = test.take(np.arange(max_test_samples))
    return Cifar10(train_part, val, test, source, val_is_test)


def stratified_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): each class gives its share of `holdout`, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = np.floor(counts / counts.sum() * holdout).astype(int)
    share[np.argsort(-(counts / counts.sum() * holdout - share))[: holdout - share.sum()]] += 1  # largest remainders
    held = []
    for c, k in zip(classes, share):
        held.append(rng.permutation(np.flatnonzero(labels == c))[:k])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def check_split(split: Split, name: str, where: str) -> None:
    """Shapes, dtype and label range: what every later stage relies on."""
    if split.images.ndim != 4 or split.images.shape[1:] != IMAGE_SHAPE or split.images.dtype != np.uint8:
        raise UserError(f"{name} images in {where} have shape {split.images.shape} {split.images.dtype}, "
                        f"expected N x 32 x 32 x 3 uint8; the data set is not CIFAR-10 or is damaged")
    if len(split.labels) != len(split.images) or len(split.labels) == 0:
        raise UserError(f"{name} split in {where} has {len(split.images)} images and {len(split.labels)} labels")
    if split.labels.min() < 0 or split.labels.max() >= len(CLASSES):
        raise UserError(f"{name} labels in {where} fall outside 0..9 "
                        f"({split.labels.min()}..{split.labels.max()}); the data set is not CIFAR-10")


def _read_parquet(files: list[str]) -> Split:
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = [], []
    for f in files:
        try:
            table = pq.read_table(f, columns=["img", "label"])
        except Exception as e:
            raise UserError(f"cannot read {f} as CIFAR-10 Parquet (columns img, label): {e}; re-copy the file")
        for cell in table.column("img").to_pylist():
            try:
                with Image.open(io.BytesIO(cell["bytes"])) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except Exception as e:
                raise UserError(f"a PNG in {f} does not decode ({e}); the file is damaged: re-copy it")
        labels.append(table.column("label").to_numpy())
    return Split(_stack(images, files[0]), np.concatenate(labels).astype(np.int64))


class NotCifar(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR-10 batch never holds."""


class CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch holds: dicts, lists, strings, numbers and numpy arrays. Any other global
    (`os.system` in a tampered file) is refused before it is looked up, so nothing in the file can run."""

    ALLOWED = {(module, name) for core in ("numpy.core", "numpy._core")
               for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                                    (f"{core}.numeric", "_frombuffer"))} | {
        ("numpy", "ndarray"), ("numpy", "memmap"), ("numpy", "dtype"),  # memmap: an ndarray (no file) once loaded
        ("_codecs", "encode")}  # encode: bytes in protocol-2 pickles

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise NotCifar(f"{module}.{name}")
        return super().find_class(module, name)


def _read_pickles(files: list[str]) -> Split:
    images, labels = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = CifarUnpickler(fh, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except NotCifar as e:
            raise UserError(f"CIFAR-10 batch {f} holds {e}, which is not part of the format and could run code: "
                            f"not loaded; re-download it with --download") from None
        except Exception as e:
            raise UserError(f"cannot read CIFAR-10 batch {f} ({type(e).__name__}: {e}); re-download it with --download")
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def _stack(images: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if shapes != {IMAGE_SHAPE}:
        raise UserError(f"images in {where} have shapes {sorted(shapes)[:3]}, expected 32 x 32 x 3; not CIFAR-10")
    return np.stack(images)


def _verify_manifest(first_file: str, train: Split, test: Split) -> None:
    """If a `manifest.json` (as in ../shared/cifar10) sits above the files, the decoded pixels must match it."""
    folder = Path(first_file).parent
    manifest = next((p / "manifest.json" for p in (folder, folder.parent) if (p / "manifest.json").is_file()), None)
    if manifest is None:
        return
    info = json.loads(manifest.read_text())
    for name, split in (("train", train), ("test", test)):
        want = info.get(name, {})
        if want.get("rows") != len(split):
            continue  # a subset (e.g. mini/) beside the full set's manifest
        got = hashlib.sha256(np.ascontiguousarray(split.images).tobytes()).hexdigest()
        if want.get("pixels_sha256") not in (None, got):
            raise UserError(f"decoded {name} pixels in {folder} do not match {manifest}; the data set is damaged: re-copy it")


def _cache_key(files: list[str]) -> str:
    h = hashlib.sha256(b"cifar10-v1")
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _write_cache(folder: Path, train: Split, test: Split) -> None:
    """Best effort: a read-only home only costs the next start its decode time. Runs started together race to
    write the same cache; the first rename wins and the others drop their copy."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, split in (("train", train), ("test", test)):
            np.save(tmp / f"{name}_images.npy", split.images)
            np.save(tmp / f"{name}_labels.npy", split.labels)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            warnings.warn(f"could not cache decoded CIFAR-10 in {folder}: {e}")


def write_parquet(split: Split, path: Path) -> None:
    """`split` as a Parquet file in the Hugging Face `plain_text` layout (img: {bytes: PNG, path: null}, label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    cells = []
    for image in split.images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"img": pa.array(cells, type=img_type), "label": pa.array(split.labels, type=pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def first_per_class(split: Split, per_class: int) -> Split:
    """The first `per_class` images of each class, in their original order."""
    keep = np.concatenate([np.flatnonzero(split.labels == c)[:per_class] for c in range(len(CLASSES))])
    return split.take(np.sort(keep))


def make_mini(data_dir: str, output: str, train_per_class: int = 200, test_per_class: int = 50) -> tuple[int, int]:
    """A small CIFAR-10 for smoke runs, from any CIFAR-10 folder: the first 200 training and 50 test images of each
    class (2,000 / 500), as Parquet; the same rows as the `mini/` folder the tests use."""
    out = Path(output).expanduser()
    if any(out.glob("*.parquet")):
        raise UserError(f"{out} already holds Parquet files; remove them or choose another --output")
    train, test, _ = load_arrays(data_dir)
    small_train, small_test = first_per_class(train, train_per_class), first_per_class(test, test_per_class)
    write_parquet(small_train, out / "train-00000-of-00001.parquet")
    write_parquet(small_test, out / "test-00000-of-00001.parquet")
    return len(small_train), len(small_test)
