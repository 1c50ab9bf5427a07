"""Where pretrained weights live in the local Hugging Face cache, without importing timm or open_clip.

Importing timm or open_clip pulls in torchvision (and with it ``torch._dynamo``): seconds on a small machine. The
preflight must name every missing file within a few seconds, so the hub repos of the weights the shipped recipes
use are listed here; ``tests/test_preflight.py`` checks every entry against timm's and open_clip's own registries,
so the table cannot drift from them. Names not listed are resolved by importing the library (still correct, only
slower).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import DebiasError

TIMM_HUB: dict[str, tuple[str, str | None]] = {
    "resnet50.tv_in1k": ("timm/resnet50.tv_in1k", None),
    "resnet50": ("timm/resnet50.a1_in1k", None),
}
"""timm model name -> (``pretrained_cfg.hf_hub_id``, ``pretrained_cfg.hf_hub_filename``)."""

CLIP_HUB: dict[tuple[str, str], str] = {
    ("RN50-quickgelu", "openai"): "timm/resnet50_clip.openai/",
    ("RN50", "openai"): "timm/resnet50_clip.openai/",
}
"""(open_clip model name, pretrained tag) -> open_clip's ``hf_hub`` entry for it."""

TIMM_FILES = ["model.safetensors", "pytorch_model.bin"]
CLIP_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def cached_file(repo_id: str, filenames: list[str], cache_dir: str | None = None) -> str | None:
    """The first of ``filenames`` found in the local hub cache for ``repo_id`` (never the network), or None."""
    from huggingface_hub import try_to_load_from_cache

    for fname in filenames:
        hit = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir or None)
        if isinstance(hit, str):
            return hit
    return None


def split_clip_hub(hub: str) -> tuple[str, list[str]]:
    """open_clip's ``hf_hub`` entry (``org/repo/`` or ``org/repo/file``) -> repo id and candidate file names."""
    if hub.endswith("/"):
        return hub.rstrip("/"), list(CLIP_FILES)
    repo_id, filename = hub.rsplit("/", 1)
    return repo_id, [filename]


def find_clip_weights(name: str, tag: str, hub: str, cache_dir: str = "", url: str = "") -> str:
    """The cached weights file of open_clip's ``hf_hub`` entry ``hub`` for ``name``/``tag``; a miss raises a
    :class:`DebiasError` that says where to get them (``url`` when there is no hub entry)."""
    found = cached_file(*split_clip_hub(hub), cache_dir=cache_dir) if hub else None
    if found is None:
        where = f"hub repo {hub.rstrip('/')}" if hub else (url or "its URL")
        raise DebiasError(f"clip.pretrained = {tag!r}: the {name} {tag} weights are not in the local cache "
                          f"(cache_dir={cache_dir or 'HF_HOME default'}) and this run does not download; fetch them "
                          f"from {where} on a connected machine and set clip.pretrained to the file path, or copy "
                          "the hub cache here")
    return found


CONVERTER = "tools/convert_openai_clip.py"
"""The tool that turns OpenAI's TorchScript CLIP archive into a safetensors file ``clip.pretrained`` loads."""


def is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's own ``RN50.pt``): a zip with ``<name>/constants.pkl``,
    the record ``torch.load`` itself looks for before refusing such a file under ``weights_only=True``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def torchscript_message(path: str) -> str:
    """The one-line error for a TorchScript ``clip.pretrained``: weights are loaded weights-only (no code runs), so
    the archive is converted once, on the user's command, by :data:`CONVERTER`."""
    from pathlib import Path

    out = str(Path(path).with_suffix(".safetensors"))
    return (f"clip.pretrained = {path!r}: a TorchScript archive (OpenAI's own CLIP file), which weights-only loading "
            f"refuses; convert it once with `python {CONVERTER} {path} {out}` (it runs the archive's code once) and "
            f"set clip.pretrained = {out!r}")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
