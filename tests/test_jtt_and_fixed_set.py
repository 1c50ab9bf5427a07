"""A biased training set is a fixed set of examples (colours drawn once per seed, only the jitter fresh each
epoch)."""
import torch

from debias.data import load_dataset
from debias.data.digits import load_colored_digits
from debias.recipe import DataCfg, load_recipe
from test_mnist import write_fake_mnist


# ------------------------------------------------------------------------------------ a fixed training set

def _same_examples_across_epochs(make) -> None:
    """``make(augment)`` loads a training split at bias < 1: its labels and attributes are those of epoch 0 in every
    epoch; with jitter the images change, without it they do not (the jitter is all that changes)."""
    jittered, plain = make(True), make(False)
    labels, attrs, first = jittered.labels.clone(), jittered.attrs.clone(), jittered.images[:].clone()
    plain_first = plain.images[:].clone()
    assert (attrs != labels).any() and (attrs == labels).any(), "a bias < 1 split has both kinds of example"
    for epoch in (1, 2, 5):
        jittered.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert torch.equal(jittered.labels, labels) and torch.equal(jittered.attrs, attrs), epoch
        assert not torch.equal(jittered.images[:], first), epoch  # a fresh jitter
        assert torch.equal(plain.images[:], plain_first), epoch  # nothing else is fresh
        assert torch.equal(plain.attrs, attrs)  # jitter or not, the same examples
    # the colour seen in the pixels is the example's attribute (all ink in its colour's channel)
    for split in (jittered, plain):
        ink = split.images[:].sum(dim=(2, 3))
        assert torch.equal(ink.argmax(1), split.attrs)


def test_digits_training_split_keeps_its_colours_across_epochs():
    _same_examples_across_epochs(lambda augment: load_colored_digits(
        DataCfg(bias=0.7, colors=["red", "green", "blue"], train_copies=3, augment=augment), seed=1).splits["train"])


def test_mnist_training_split_keeps_its_colours_across_epochs(tmp_path):
    root = write_fake_mnist(tmp_path)

    def make(augment: bool):
        recipe = load_recipe("recipes/colored_mnist_paper.toml", [
            f'data.root="{root}"', "data.train_per_class=40", "data.test_per_class=20", "data.image_size=32",
            "data.bias=0.7", "data.train_copies=2", f"data.augment={str(augment).lower()}"])
        return load_dataset(recipe).splits["train"]
    _same_examples_across_epochs(make)


def test_unaugmented_training_split_is_the_jitter_free_render_of_the_same_examples():
    cfg = DataCfg(bias=0.7, train_copies=2)
    train = load_colored_digits(cfg, seed=3).splits["train"]
    plain = load_colored_digits(DataCfg(bias=0.7, train_copies=2, augment=False), seed=3).splits["train"]
    train.set_epoch(4)
    same = train.unaugmented()
    assert torch.equal(same.images, plain.images) and torch.equal(same.attrs, plain.attrs)
    assert same.render is None and torch.equal(train.attrs, same.attrs)
