"""OpenAI's CLIP file (a TorchScript archive) -> safetensors with tools/convert_openai_clip.py, loaded weights-only.

The fixture is a real TorchScript archive of OpenAI's shape at a tiny size: an open_clip ResNet CLIP with QuickGELU,
float16 weights as OpenAI stores them, the ``input_resolution`` / ``context_length`` / ``vocab_size`` entries of
OpenAI's state dict, traced with open_clip's own ``trace_model`` recipe and saved with ``torch.jit.save``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, convert_weights_to_lp

from debias.errors import DebiasError
from debias.models.clip import load_clip
from debias.preflight import missing_inputs
from debias.recipe import ClipCfg, Recipe

ROOT = Path(__file__).resolve().parent.parent
NAME = "TinyRN-quickgelu"
CFG = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


def _converter():
    spec = importlib.util.spec_from_file_location("convert_openai_clip", ROOT / "tools" / "convert_openai_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_config(monkeypatch):
    """The tiny architecture registered as an open_clip model name for this test only."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, NAME, CFG)
    return NAME


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CLIP(CFG["embed_dim"], CFG["vision_cfg"], CFG["text_cfg"], quick_gelu=True).eval()
    del model.context_length, model.vocab_size  # OpenAI's archive holds these three as tensors in its state dict
    for key, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        model.register_buffer(key, torch.tensor(value))
    mask = model.attn_mask  # a plain attribute in OpenAI's model (a constant of the trace), not a state-dict entry
    del model.attn_mask
    model.attn_mask = mask
    convert_weights_to_lp(model, torch.float16)  # OpenAI's weights are float16 (convolutions, linear, projections)
    images = torch.ones(1, 3, 32, 32, dtype=torch.float16)
    text = torch.zeros(1, 16, dtype=torch.int)
    traced = torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (text,)})
    path = tmp_path_factory.mktemp("openai") / "RN-tiny.pt"
    torch.jit.save(traced, str(path))
    return path


def test_archive_is_refused_with_the_converter_command(openai_archive, tiny_config):
    with pytest.raises(DebiasError) as err:
        load_clip(ClipCfg(name=tiny_config, pretrained=str(openai_archive)))
    msg = str(err.value)
    out = str(openai_archive.with_suffix(".safetensors"))
    assert "\n" not in msg and "TorchScript" in msg
    assert f"python tools/convert_openai_clip.py {openai_archive} {out}" in msg
    recipe = Recipe()
    recipe.clip.name, recipe.clip.pretrained = tiny_config, str(openai_archive)
    assert missing_inputs(recipe) == [msg]  # the preflight names it before anything loads


def test_converted_weights_load_and_match_openais_own_loader(openai_archive, tiny_config, tmp_path, capsys):
    out = tmp_path / "weights" / "RN-tiny.safetensors"
    assert _converter().main([str(openai_archive), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"clip.name = {tiny_config!r}" in printed and str(out) in printed
    clip = load_clip(ClipCfg(name=tiny_config, pretrained=str(out)))  # weights-only: safetensors
    reference = open_clip.load_openai_model(str(openai_archive), precision="fp32", device="cpu").eval()
    x = torch.rand(2, 3, 32, 32)
    tokens = clip.tokenizer(["a photo of a bird.", "a photo of water."])
    with torch.no_grad():
        assert torch.allclose(clip.visual(x), reference.visual(x), atol=1e-5)
        assert torch.allclose(clip.model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5)
        assert torch.equal(clip.model.logit_scale, reference.logit_scale)
    # every weight is OpenAI's own (not a fresh initialisation that happens to load)
    archive = torch.jit.load(str(openai_archive), map_location="cpu").state_dict()
    for key, value in clip.model.state_dict().items():
        assert torch.equal(value, archive[key].float()), key


@pytest.mark.parametrize("case, needle", [
    ("missing", "file not found"),
    ("plain", "not a TorchScript archive"),
    ("suffix", "expected an output name ending in .safetensors"),
    ("not clip", "not an OpenAI CLIP archive"),
])
def test_converter_refuses_bad_input_with_one_line(openai_archive, tmp_path, capsys, case, needle):
    src, dst = openai_archive, tmp_path / "out.safetensors"
    if case == "missing":
        src = tmp_path / "nope.pt"
    elif case == "plain":
        src = tmp_path / "plain.pt"
        torch.save({"w": torch.zeros(2)}, src)
    elif case == "suffix":
        dst = tmp_path / "out.pt"
    else:
        src = tmp_path / "linear.pt"
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(src))
    assert _converter().main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not dst.exists()
