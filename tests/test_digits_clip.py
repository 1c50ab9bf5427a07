"""The shipped digits CLIP: offline loading, checksum, tokenizer and its vocabulary guard, zero-shot quality per
concept on evaluation-pool images, the tool's ``--evaluate`` line, and a tiny training run.

Never modifies the shipped files: tampering happens on a copy in ``tmp_path``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from debias.errors import DebiasError
from debias.models import digits_clip as dc
from debias.models import digits_clip_train as dct

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped() -> dc.DigitsClip:
    return dc.load_digits_clip()


def test_shipped_model_loads_offline_with_verified_checksum(shipped: dc.DigitsClip) -> None:
    folder = dc.ASSET_DIR
    digest = dc.verify_checksum(folder)
    training = json.loads((folder / dc.TRAINING_FILE).read_text())
    assert training["weights_sha256"] == digest
    config = json.loads((folder / dc.CONFIG_FILE).read_text())
    assert config["model_cfg"] == dc.DIGITS_CLIP_CFG
    assert config["model_cfg"]["vision_cfg"]["patch_size"] is None  # ModifiedResNet image tower
    assert type(shipped.model.visual).__name__ == "ModifiedResNet"
    assert not shipped.model.training
    assert not any(p.requires_grad for p in shipped.model.parameters())
    assert shipped.image_size == 32 and len(shipped.mean) == 3 and len(shipped.std) == 3
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= 10 * 1024 * 1024, f"asset folder is {size} bytes; at most 10 MB expected"


def test_token_embedding_rebuilt_with_only_corpus_rows(shipped: dc.DigitsClip) -> None:
    weight = shipped.model.token_embedding.weight
    assert weight.shape == (49408, dc.DIGITS_CLIP_CFG["text_cfg"]["width"])
    used = torch.zeros(len(weight), dtype=torch.bool)
    used[dct.corpus_vocabulary()] = True
    assert weight[~used].abs().sum() == 0
    assert (weight[used].abs().sum(1) > 0).all()


@pytest.mark.parametrize("damage", ["tamper", "delete_weights", "delete_checksum"])
def test_damaged_weights_give_clear_error(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "digits_clip"
    shutil.copytree(dc.ASSET_DIR, folder)
    weights = folder / dc.WEIGHTS_FILE
    if damage == "tamper":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=r"digits_clip\.safetensors.*regenerate with python tools/train_digits"):
            dc.load_digits_clip(path=folder)
    else:
        missing = weights if damage == "delete_weights" else folder / dc.CHECKSUM_FILE
        missing.unlink()
        with pytest.raises(FileNotFoundError, match=rf"{missing.name}.*regenerate with python tools/train_digits"):
            dc.load_digits_clip(path=folder)


def test_tokenizer_works_offline(shipped: dc.DigitsClip) -> None:
    tokens = shipped.tokenizer(["a photo of a red digit.", "a photo of a digit with the value 7."])
    assert tokens.shape == (2, dc.CONTEXT_LENGTH)
    assert (tokens[:, 0] == 49406).all() and (tokens.argmax(1) > 0).all()  # start and end of text
    assert torch.equal(tokens, dc.get_tokenizer()(["a photo of a red digit.", "a photo of a digit with the value 7."]))
    captions, _ = dct.corpus_captions()
    assert (shipped.tokenizer(captions) != 0).sum(1).max() < dc.CONTEXT_LENGTH  # no caption is truncated
    for concept in dc.PROBES:  # every probe is a corpus caption
        assert set(dc.probe_captions(concept)) <= set(captions), concept


@pytest.mark.parametrize("caption, word", [("a photo of a digit on wood.", "wood"),
                                           ("a photo of a teal digit.", "teal")])
def test_unknown_word_is_refused(shipped: dc.DigitsClip, caption: str, word: str) -> None:
    with pytest.raises(DebiasError) as err:
        shipped.encode_texts(["a photo of a red digit.", caption])
    msg = str(err.value)
    assert f"the word {word!r}" in msg and repr(caption) in msg, msg
    assert "known words:" in msg and "grass" in msg and "square" in msg and "\n" not in msg, msg
    with pytest.raises(DebiasError, match=word):
        shipped.tokenizer(caption)  # the tokenizer that ClipModel and concepts use refuses too
    assert shipped.encode_texts(["a photo of a red five on grass with a small square."]).shape[0] == 1


def test_heldout_split_is_fixed_and_disjoint() -> None:
    held_in, held_out = dc.heldout_split()
    assert len(held_in) + len(held_out) == 1797 and 350 <= len(held_out) <= 370
    assert not set(held_in.tolist()) & set(held_out.tolist())
    assert torch.equal(held_out, dc.heldout_split()[1])


def test_zero_shot_per_concept_on_evaluation_images(shipped: dc.DigitsClip) -> None:
    images, attrs = dc.evaluation_images(n=300)
    assert len(images) == 300 and set(attrs) == {"digit", "color", "background", "marker"}
    acc = dc.zero_shot(shipped.model, shipped.tokenizer, shipped.mean, shipped.std, images, attrs)
    # the shipped model on all 1,436 evaluation images: colour 1.000, digit 0.996, background 0.721, marker 0.669
    # (chance 0.125, 0.10, 0.25, 0.33); bounds a few points under those, for 300 images
    assert acc["color"] >= 0.97, acc
    assert acc["digit"] >= 0.95, acc
    assert acc["background"] >= 0.62, acc
    assert acc["marker"] >= 0.58, acc


def test_evaluate_tool_prints_one_json_line(tmp_path: Path) -> None:
    tool = [sys.executable, str(ROOT / "tools" / "train_digits_clip.py"), "--evaluate"]
    done = subprocess.run(tool, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    zs = json.loads(lines[0])["zero_shot"]
    assert {"color", "digit", "background", "marker"} <= set(zs)
    assert all(0 <= v <= 1 for v in zs.values())
    missing = subprocess.run(tool + ["--out", str(tmp_path / "absent")], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert missing.returncode == 2 and "absent" in missing.stderr, missing.stderr


def test_zero_shot_on_heldout_sample(shipped: dc.DigitsClip) -> None:
    images, digits, colors = dc.heldout_images(n=240, seed=1)
    acc = dc.zero_shot_accuracy(shipped.model, shipped.tokenizer, shipped.mean, shipped.std, images, digits, colors)
    assert acc["colour"] >= 0.97, acc
    assert acc["digit"] >= 0.85, acc
    assert acc["digit_value"] >= 0.80, acc


def test_tiny_training_run_decreases_loss_and_reloads(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    summary = dct.train_digits_clip(out, seed=3, steps=30, batch_size=32, lr=2e-3, warmup=3,
                                   evaluate=False, progress=False)
    losses = summary["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    for name in (dc.CONFIG_FILE, dc.WEIGHTS_FILE, dc.CHECKSUM_FILE, dc.TRAINING_FILE):
        assert (out / name).is_file()
    loaded = dc.load_digits_clip(path=out)
    assert loaded.encode_texts(["a photo of the digit seven."]).shape == (1, dc.DIGITS_CLIP_CFG["embed_dim"])
    assert set(summary["zero_shot_probes"]) >= {"color", "digit", "background", "marker"}
    assert loaded.encode_images(torch.rand(2, 3, 32, 32)).shape == (2, dc.DIGITS_CLIP_CFG["embed_dim"])


def test_training_is_deterministic(tmp_path: Path) -> None:
    kwargs = dict(seed=5, steps=4, batch_size=16, evaluate=False, progress=False)
    a = dct.train_digits_clip(tmp_path / "a", **kwargs)
    b = dct.train_digits_clip(tmp_path / "b", **kwargs)
    assert a["losses"] == b["losses"]
    assert a["weights_sha256"] == b["weights_sha256"]


def test_corpus_batches_name_subsets_and_positives_follow_them() -> None:
    corpus = dct.WorldCorpus(dc.CONTEXT_LENGTH, seed=0)
    images, tokens, attrs, named = corpus.batch(48)
    assert images.shape == (48, 3, dc.IMAGE_SIZE, dc.IMAGE_SIZE) and tokens.shape == (48, dc.CONTEXT_LENGTH)
    assert named.any(1).all()  # every caption names something
    pos = dct.positives(attrs, named)
    assert pos.diagonal().all()
    i, j = 0, 1
    expect = all(bool(attrs[i, a] == attrs[j, a]) or not bool(named[j, a]) for a in range(4))
    assert bool(pos[i, j]) == expect
    again = dct.WorldCorpus(dc.CONTEXT_LENGTH, seed=0).batch(48)
    assert torch.equal(images, again[0]) and torch.equal(tokens, again[1])
    assert dct.caption_for(5, 0, 1, 1, (True, True, True, True), 0, True) == \
        "a photo of a red five on grass with a small square."
