"""Files of a run directory: atomic writes, safe checkpoints, the ``done`` marker.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed over the old one, and
the folder is fsynced (the rename is on disk), so a kill or a power loss at any moment leaves either the previous good
file or the new one, never a partial file.
Weights go to safetensors; other training state to a torch file loaded with ``weights_only=True`` (no code
can run on load).
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .errors import DebiasError

DONE_MARKER = "done"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss only once its directory is synced
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename, a new file) to disk; POSIX only (Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # a file system that cannot sync one
            raise
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically (to a temporary file, then renamed). Byte-identical for identical tensors and
    metadata: safetensors writes the metadata in hash order, which changes from one process to the next, so the
    header is rewritten with the metadata's keys sorted (same length, same tensors)."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, _sorted_metadata(data) if metadata else data)


def _sorted_metadata(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # not expected (the same keys and values, reordered); keep safetensors' own header then
        return data
    return data[:8] + text.ljust(n) + data[8 + n:]  # safetensors pads its header with spaces


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise DebiasError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Training state (optimizer, scheduler, RNG) as a torch file, written atomically."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a file crafted to run code on unpickling is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DebiasError(f"{path}: refused to load (not a plain tensor/state file: "
                          f"{str(exc).splitlines()[0][:200]})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DebiasError(f"{path}: not valid JSON ({exc})") from None


def check_writable(out: str | Path) -> Path:
    """Create ``out`` if needed and check that files can be written there; one clear error otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-check.", delete=True)
        probe.close()
    except OSError as exc:
        raise DebiasError(f"--out {str(out)!r}: output directory is not writable ({exc.strerror})") from None
    return out
