"""Concept scores: decision alignment decides dominance, representation is normalised by plain CLIP."""
import itertools

import torch

from debias.concepts import ConceptSet, alignment, dominant, read_concepts


def _balanced():
    """Every (digit, colour) pair 25 times: the two concepts vary independently."""
    pairs = list(itertools.product(range(2), range(2))) * 25
    labels = torch.tensor([p[0] for p in pairs])
    attrs = torch.tensor([p[1] for p in pairs])
    return labels, attrs


def _setup():
    labels, attrs = _balanced()
    basis = torch.eye(4)
    text = {"color": basis[:2], "digit": basis[2:]}
    concepts = [ConceptSet("color", ["red", "green"], "attr", "spurious"),
                ConceptSet("digit", ["five", "eight"], "label", "core")]
    emb = torch.nn.functional.normalize(basis[attrs] + basis[2 + labels], dim=1)  # reads both concepts
    return labels, attrs, text, concepts, emb


def test_alignment_is_one_when_equal_and_zero_when_independent():
    labels, attrs = _balanced()
    text = torch.eye(2)
    assert alignment(attrs, text[attrs], text) == 1.0
    assert alignment(1 - attrs, text[attrs], text) == 1.0  # a relabelling is still full dependence
    assert abs(alignment(labels, text[attrs], text)) < 1e-9
    # one class predicted for every image, one caption read for every image: nothing follows anything
    # (scikit-learn alone scores two constant labellings 1.0)
    ones = torch.zeros_like(attrs)
    assert alignment(ones, text[ones], text) == 0.0 and alignment(ones, text[attrs], text) == 0.0


def test_decision_alignment_names_what_the_model_follows_though_both_are_represented():
    labels, attrs, text, concepts, emb = _setup()
    for preds, want in ((attrs, "color"), (labels, "digit")):
        r = read_concepts(emb, emb, labels, attrs, concepts, text, preds)
        assert r.representation() == {"color": 1.0, "digit": 1.0}  # the embedding carries both concepts
        assert dominant(r.scores()) == want
        other = "digit" if want == "color" else "color"
        assert r.scores()[want] == 1.0 and r.scores()[other] < 1e-9


def test_representation_is_normalised_by_plain_clip_and_chance():
    labels, attrs, text, concepts, emb = _setup()
    colour_only = torch.nn.functional.normalize(torch.eye(4)[attrs] + 0.01 * torch.eye(4)[2], dim=1)
    r = read_concepts(colour_only, emb, labels, attrs, concepts, text, attrs)
    rep = r.representation()
    assert rep["color"] == 1.0 and abs(rep["digit"]) < 1e-6  # digit read at chance: always "five"


def test_dominant_reports_none_on_a_tie():
    assert dominant({"color": 1.0, "digit": 0.98}) == "none"
    assert dominant({"color": 1.0, "digit": 0.5}) == "color"
    assert dominant({"color": float("nan"), "digit": 0.2}) == "digit"
    assert dominant({"color": float("nan")}) == "none"
