"""Run and sweep folders on local disk or remote storage (s3://, gs://), through pyarrow's filesystems, as Ray does.

A path with `://` is a URI; anything else is a local folder. Ray reports checkpoint paths of remote storage
without their scheme (`bucket/run/checkpoint_epoch_0001`): `as_uri` puts the storage root's scheme back, so a
path this project keeps or prints can always be opened again with `ray.train.Checkpoint(path)`.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from . import checkpoint as ckpt


def is_remote(path: str) -> bool:
    return "://" in str(path)


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def as_uri(path: str | None, root: str) -> str | None:
    """`path` as Ray reported it, made openable: remote storage's paths get the root's scheme back."""
    if path is None or not is_remote(root) or is_remote(path):
        return path
    return f"{root.split('://', 1)[0]}://{path}"  # s3: "bucket/key"; file: "/abs/path" (-> file:///abs/path)


def has_files(path: str) -> bool:
    """Whether a folder (local, or a URI) holds anything: a run or sweep that a new one must not overwrite."""
    if not is_remote(path):
        return Path(path).is_dir() and any(Path(path).iterdir())
    import pyarrow.fs

    fs, inside = filesystem(path)
    if fs.get_file_info(inside).type != pyarrow.fs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(inside, recursive=False, allow_not_found=True)))


def latest_checkpoint(run_path: str) -> str | None:
    """The newest complete checkpoint folder of a run (local path or URI), or None."""
    if not is_remote(run_path):
        found = ckpt.latest_in(run_path)
        return str(found) if found else None
    import pyarrow.fs

    fs, inside = filesystem(run_path)
    files = fs.get_file_info(pyarrow.fs.FileSelector(inside, recursive=True, allow_not_found=True))
    sizes = {f.path[len(inside):].lstrip("/"): f.size for f in files if f.type == pyarrow.fs.FileType.File}
    for folder in sorted({k.split("/", 1)[0] for k in sizes if k.startswith("checkpoint_epoch_")}, reverse=True):
        if f"{folder}/{ckpt.META_FILE}" not in sizes or f"{folder}/{ckpt.STATE_FILE}" not in sizes:
            continue
        with fs.open_input_stream(f"{inside}/{folder}/{ckpt.META_FILE}") as f:
            meta = ckpt.parse_meta(f.read())
        if meta and meta.get("state_bytes", -1) in (-1, sizes[f"{folder}/{ckpt.STATE_FILE}"]):
            return f"{run_path.rstrip('/')}/{folder}"
    return None


@contextlib.contextmanager
def local_copy(folder: str):
    """A checkpoint folder as a local directory: itself, or a temporary copy of a remote one."""
    if not is_remote(folder):
        yield folder
        return
    import pyarrow.fs

    fs, inside = filesystem(folder)
    with tempfile.TemporaryDirectory(prefix="resnet_ckpt_") as tmp:
        pyarrow.fs.copy_files(inside, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield tmp


def write_file(folder: str, name: str, payload: bytes) -> None:
    """Write into a local folder or remote storage."""
    if not is_remote(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(payload)
        return
    fs, inside = filesystem(folder)
    fs.create_dir(inside, recursive=True)
    with fs.open_output_stream(f"{inside}/{name}") as f:
        f.write(payload)


def read_file(folder: str, name: str) -> bytes | None:
    """Read from a local folder or remote storage; None where the file is not there."""
    if not is_remote(folder):
        path = Path(folder) / name
        return path.read_bytes() if path.is_file() else None
    import pyarrow.fs

    fs, inside = filesystem(folder)
    if fs.get_file_info(f"{inside}/{name}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{inside}/{name}") as f:
        return f.read()
