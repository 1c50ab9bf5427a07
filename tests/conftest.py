import open_clip
import pytest
import torch

from debias.models.clip import ClipModel


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tiny_clip() -> ClipModel:
    """A random-weight ResNet CLIP at 32 px, built from an open_clip config (tests of surgery mechanics)."""
    torch.manual_seed(0)
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8, patch_size=None),
               text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    model = open_clip.model.CLIP(**cfg)
    tok = open_clip.get_tokenizer("RN50", context_length=16)
    return ClipModel(model, tok, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "tiny")
