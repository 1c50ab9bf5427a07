"""Convert OpenAI's TorchScript CLIP archive (``RN50.pt``) into a safetensors file that ``clip.pretrained`` loads.

debias loads CLIP weights weights-only (no code in a weights file ever runs), and ``torch.load`` refuses a TorchScript
archive under that rule. This tool is the one exception, on your explicit command: it opens the archive with
``torch.jit.load`` (which runs the archive's code once, on the CPU), takes its state dict, checks that open_clip can
build a CLIP from it, and writes the tensors, unchanged, to safetensors. Run it only on a file you trust (OpenAI's
own download).

    python tools/convert_openai_clip.py RN50.pt RN50.safetensors
    # then, in the recipe or with --set:  clip.name = "RN50-quickgelu"  clip.pretrained = "/path/RN50.safetensors"

Prints the open_clip model names whose architecture matches the weights (OpenAI's CLIPs use QuickGELU, so the
``-quickgelu`` names). Exit 2 with a one-line message for a missing file, a file that is not a TorchScript archive, or
an archive that is not an OpenAI CLIP.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from debias.errors import DebiasError

NON_TENSOR_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Entries of OpenAI's archive that describe the model rather than weigh it; open_clip drops them too."""


def matching_names(model) -> list[str]:
    """open_clip model names (QuickGELU) whose config builds exactly ``model``'s architecture."""
    import open_clip

    v, t = model.visual, model
    found = {"embed_dim": int(model.text_projection.shape[1]), "image_size": int(v.image_size),
             "layers": [len(getattr(v, f"layer{i}")) for i in range(1, 5)],
             "width": int(v.layer1[0].conv1.out_channels), "context_length": int(t.positional_embedding.shape[0]),
             "vocab_size": int(t.token_embedding.weight.shape[0]), "text_width": int(t.ln_final.weight.shape[0]),
             "text_layers": len(t.transformer.resblocks)}
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vc, tc = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if not (cfg.get("quick_gelu") and isinstance(vc.get("layers"), list) and not vc.get("patch_size")):
            continue
        have = {"embed_dim": cfg.get("embed_dim"), "image_size": vc.get("image_size"), "layers": list(vc["layers"]),
                "width": vc.get("width"), "context_length": tc.get("context_length"),
                "vocab_size": tc.get("vocab_size"), "text_width": tc.get("width"), "text_layers": tc.get("layers")}
        if have == found:
            names.append(name)
    return names


def convert(src: str | Path, dst: str | Path) -> list[str]:
    """Write the weights of the TorchScript archive ``src`` to the safetensors file ``dst``; the matching open_clip
    model names. Raises :class:`DebiasError` for a missing file or one that is not an OpenAI CLIP archive."""
    import torch
    from open_clip.model import build_model_from_openai_state_dict

    from debias.io import save_tensors
    from debias.models.hub import is_torchscript_archive

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise DebiasError(f"{src}: file not found")
    if not is_torchscript_archive(str(src)):
        raise DebiasError(f"{src}: not a TorchScript archive; a plain weights file needs no conversion: give it to "
                          "clip.pretrained as it is")
    if dst.suffix != ".safetensors":
        raise DebiasError(f"{dst}: expected an output name ending in .safetensors (open_clip reads the format from "
                          "the name)")
    if dst.resolve() == src.resolve():
        raise DebiasError(f"{dst}: the output would overwrite the archive; give another name")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DebiasError(f"{dst}: cannot create its folder ({exc.strerror})") from None
    try:
        archive = torch.jit.load(str(src), map_location="cpu")
    except RuntimeError as exc:
        raise DebiasError(f"{src}: torch.jit.load cannot read it: {str(exc).splitlines()[0][:200]}") from None
    state = {k: v for k, v in archive.state_dict().items() if k not in NON_TENSOR_KEYS}
    try:  # the same check open_clip's own OpenAI loader makes: a CLIP of OpenAI's layout, every key used
        model = build_model_from_openai_state_dict(dict(state), cast_dtype=torch.float32)
    except (KeyError, RuntimeError, AssertionError, IndexError) as exc:
        raise DebiasError(f"{src}: not an OpenAI CLIP archive (open_clip cannot build a CLIP from its state dict: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    # tensors unchanged (OpenAI stores most weights in float16; loading casts them to the model's dtype), each its
    # own copy: safetensors refuses tensors that share memory
    try:
        save_tensors(dst, {k: v.clone() for k, v in state.items()}, metadata={"source": src.name, "format": "pt"})
    except OSError as exc:
        raise DebiasError(f"{dst}: cannot write it ({exc.strerror})") from None
    return matching_names(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive", help="OpenAI's TorchScript CLIP file, e.g. RN50.pt")
    p.add_argument("output", help="the safetensors file to write, e.g. RN50.safetensors")
    args = p.parse_args(argv)
    try:
        names = convert(args.archive, args.output)
    except DebiasError as e:
        print(f"convert_openai_clip: error: {e}", file=sys.stderr)
        return 2
    out = str(Path(args.output).resolve())
    print(f"wrote {out}")
    if names:
        print(f"use it with: clip.name = {names[0]!r}, clip.pretrained = {out!r}"
              + (f" (the same architecture: {', '.join(names[1:])})" if len(names) > 1 else ""))
    else:
        print(f"no open_clip model config matches its architecture; set clip.name to a QuickGELU config of the same "
              f"shape and clip.pretrained = {out!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
