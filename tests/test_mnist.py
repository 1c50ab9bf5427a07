"""Coloured MNIST from a local torchvision-format folder: a tiny fake MNIST written in the real idx-ubyte format."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from debias.data import load_dataset
from debias.data.colored_mnist import load as load_colored_mnist, mnist_base_indices
from debias.data.lazy import LazyImages
from debias.errors import DebiasError
from debias.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "colored_mnist_paper.toml"
TRAIN_PER_DIGIT = {0: 6, 3: 5, 5: 60, 8: 70}
TEST_PER_DIGIT = {0: 3, 3: 2, 5: 25, 8: 30}


def _digit_images(digits: list[int], gen: torch.Generator) -> torch.Tensor:
    """28 px uint8 strokes that differ by digit and by image: a ring for 8, a bar for 5, noise elsewhere."""
    n = len(digits)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    out = torch.zeros(n, 28, 28)
    for i, d in enumerate(digits):
        cy, cx = 14 + torch.randint(-3, 4, (2,), generator=gen).float()
        r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        if d == 8:
            img = ((r > 5) & (r < 9)).float()
        elif d == 5:
            img = ((yy - cy).abs() < 3).float() * ((xx - cx).abs() < 8).float()
        else:
            img = (torch.rand(28, 28, generator=gen) > 0.8).float()
        out[i] = img * (0.6 + 0.4 * torch.rand(28, 28, generator=gen))
    return (out * 255).round().to(torch.uint8)


def _idx_bytes(tensor: torch.Tensor) -> bytes:
    """The idx-ubyte format MNIST ships in: magic 0x0000 08 <ndim>, big-endian dims, then the uint8 data."""
    header = struct.pack(">I", 0x0800 + tensor.dim()) + b"".join(struct.pack(">I", s) for s in tensor.shape)
    return header + tensor.contiguous().numpy().tobytes()


def write_fake_mnist(root: Path, gz: bool = False, seed: int = 0) -> Path:
    """``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` with a few hundred fake digits."""
    gen = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, counts in (("train", TRAIN_PER_DIGIT), ("t10k", TEST_PER_DIGIT)):
        digits = [d for d, n in counts.items() for _ in range(n)]
        digits = [digits[i] for i in torch.randperm(len(digits), generator=gen).tolist()]
        files = {f"{prefix}-images-idx3-ubyte": _idx_bytes(_digit_images(digits, gen)),
                 f"{prefix}-labels-idx1-ubyte": _idx_bytes(torch.tensor(digits, dtype=torch.uint8))}
        for name, data in files.items():
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("mnist"))


def _recipe(root: Path, *extra: str):
    return load_recipe(RECIPE, [f'data.root="{root}"', "data.train_per_class=40", "data.test_per_class=20",
                                "data.image_size=32", *extra])


def test_paper_recipe_loads_through_the_dispatcher(mnist_root):
    recipe = _recipe(mnist_root)
    bundle = load_dataset(recipe)
    s = bundle.splits
    assert set(s) == {"train", "val", "test", "shifted", "swapped", "grayscale"}
    assert bundle.shift_splits == ("shifted", "swapped", "grayscale")
    assert bundle.class_names == ["5", "8"] and bundle.attr_names == ["red", "green", "gray"]
    assert bundle.attribute == "color" and bundle.num_classes == 2
    assert len(s["train"]) == 80 and len(s["test"]) == 40 and len(s["shifted"]) == 40  # copies = 1 in the recipe
    for name in ("train", "test", "val"):
        assert torch.bincount(s[name].labels).tolist() == [len(s[name]) // 2] * 2, name
    img, label, attr = s["train"][0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert isinstance(label, int) and isinstance(attr, int)
    # the paper's colouring at bias 1.0: every 5 red, every 8 green, digit in one channel only
    for name in ("train", "val", "test"):
        assert torch.equal(s[name].attrs, s[name].labels), name
    red = s["test"].images[s["test"].attrs == 0]
    assert red[:, 1:].abs().max() == 0 and red[:, 0].max() > 0.5
    assert torch.equal(s["swapped"].attrs, 1 - s["swapped"].labels)
    gray = s["grayscale"].images[:]
    assert (s["grayscale"].attrs == 2).all() and torch.equal(gray[:, 0], gray[:, 2])
    assert s["test"].group_names() == ["5|red", "5|green", "5|gray", "8|red", "8|green", "8|gray"]
    u = bundle.unlabeled
    assert u is not None and len(u) == 2 * 10 * 4  # 10 base digits per class (capped at train * 0.1 / 0.4), 4 copies
    assert torch.bincount(u.labels).tolist() == [40, 40] and 0.2 < (u.attrs == u.labels).float().mean() < 0.8


def test_evaluation_splits_pair_the_same_digits_and_nothing_leaks(mnist_root):
    recipe = _recipe(mnist_root)
    s = load_dataset(recipe).splits
    test, gray = s["test"], s["grayscale"]
    own = test.images[:][torch.arange(len(test)), test.attrs]  # each test digit in its colour's channel
    assert torch.allclose(own, gray.images[:][:, 0])  # the grayscale split renders the same base digits
    train_digits = torch.tensor([d for d, n in TRAIN_PER_DIGIT.items() for _ in range(n)])
    test_digits = torch.tensor([d for d, n in TEST_PER_DIGIT.items() for _ in range(n)])
    index = mnist_base_indices(train_digits, test_digits, recipe.data, recipe.seed)
    seen = torch.cat([idx for idx, _ in index.values()])
    assert len(seen) == len(set(seen.tolist())), "a base image is in two of train / eval / val / unlabeled"
    assert (index["train"][0] < len(train_digits)).all()  # training digits come from MNIST's training set
    assert (index["eval"][0] >= len(train_digits)).sum() == 2 * min(TEST_PER_DIGIT[5], 20)  # test set first
    val_counts = torch.bincount(index["val"][1]).tolist()
    assert val_counts[0] == val_counts[1] > 0 and len(index["unlabeled"][0]) > 0


def test_images_are_lazy_deterministic_and_batch_independent(mnist_root):
    recipe = _recipe(mnist_root, "data.image_size=224", "data.augment=true", "data.bias=0.5")
    bundle = load_colored_mnist(recipe.data, recipe.seed)
    train = bundle.splits["train"]
    assert isinstance(train.images, LazyImages) and train.images.shape == (80, 3, 224, 224)
    one = train.images[3]
    assert one.shape == (3, 224, 224)
    assert torch.equal(one, train.images[2:5][1]) and torch.equal(one, train.images[torch.tensor([7, 3])][1])
    assert torch.equal(train.images[-1], train.images[79])
    with pytest.raises(IndexError):
        train.images[80]
    loader = DataLoader(train, batch_size=16, shuffle=False)
    images, labels, attrs = next(iter(loader))
    assert images.shape == (16, 3, 224, 224) and torch.equal(images[5], train.images[5])
    assert torch.equal(labels, train.labels[:16]) and torch.equal(attrs, train.attrs[:16])
    again = load_colored_mnist(recipe.data, recipe.seed).splits["train"]
    assert torch.equal(again.images[0:4], train.images[0:4]) and torch.equal(again.attrs, train.attrs)
    first = train.images[0:8].clone()
    train.set_epoch(1)
    assert not torch.equal(first, train.images[0:8])  # fresh jitter each epoch
    assert torch.equal(again.attrs, train.attrs)  # of the same examples: colours are drawn once per seed


def test_without_jitter_at_28_px_the_render_is_the_mnist_digit(mnist_root):
    recipe = _recipe(mnist_root, "data.image_size=28")
    test = load_dataset(recipe).splits["test"]
    img = test.images[0]
    channel = int(test.attrs[0])
    assert torch.all((img[channel] * 255 - (img[channel] * 255).round()).abs() < 1e-3)  # exact uint8 levels


def test_gzipped_files_are_accepted(tmp_path):
    root = write_fake_mnist(tmp_path, gz=True)
    bundle = load_dataset(_recipe(root))
    assert len(bundle.splits["train"]) == 80
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # extracted for torchvision


def test_missing_files_name_each_file_and_where_it_goes(tmp_path):
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DebiasError) as info:
        load_dataset(_recipe(root))
    msg = str(info.value)
    assert "\n" not in msg and "data.root" in msg and str(root / "MNIST" / "raw") in msg
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert "train-images-idx3-ubyte" not in msg.replace("t10k", "")  # present files are not reported


def test_root_pointing_at_the_raw_folder_gets_a_hint(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    with pytest.raises(DebiasError, match="set data.root = "):
        load_dataset(_recipe(raw))


def test_too_many_images_per_class_is_a_clear_error(mnist_root):
    with pytest.raises(DebiasError, match=r"data.train_per_class = 500: .* only 60 images of digit 5"):
        load_dataset(_recipe(mnist_root, "data.train_per_class=500"))
    with pytest.raises(DebiasError, match=r"data.test_per_class = 900"):
        load_dataset(_recipe(mnist_root, "data.test_per_class=900"))


def test_other_digits_colours_and_all_of_mnist(mnist_root):
    recipe = _recipe(mnist_root, "data.classes=[0, 3]", 'data.colors=["blue", "yellow", "cyan"]',
                     "data.train_per_class=0", "data.test_per_class=0")
    bundle = load_dataset(recipe)
    assert bundle.attr_names == ["blue", "yellow", "cyan", "gray"]
    assert len(bundle.splits["train"]) > 0 and len(bundle.splits["test"]) == sum(TEST_PER_DIGIT[d] for d in (0, 3))
