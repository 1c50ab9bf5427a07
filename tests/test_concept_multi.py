"""``concept`` with several spurious concepts: each has its own stream predictions; ``combine = 'joint'`` penalises
their joint prediction with one MI term and one adversary, ``combine = 'sum'`` each concept's own, all logged; with one
spurious concept the losses are those of the one-concept method."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from debias.errors import DebiasError
from debias.methods.concept import joint_rows, soft_mutual_information

TINY = ["train.epochs=2", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32", "model.name=resnet10t",
        "concept.unlabeled_batch_size=8", "train.method=concept"]
TWO = "recipes/two_nuisances.toml"

ONE_CONCEPT_TERMS = {
    # recipe -> the terms of steps 0..3 (float.hex): the recipe's [concept] section (graft source, adversary,
    # running joint, self-training) with self-training on from step 0, on the TINY budget, 2 CPU threads
    "recipes/colored_digits.toml": [
        {"loss": "0x1.a576bc0000000p+1", "nll": "0x1.8971900000000p-1", "penalty": "0x1.1e97800000000p-16",
         "pseudo_label": "0x1.2e85a80000000p-1", "adversary": "0x1.80d6260000000p-1"},
        {"loss": "0x1.1fa0ca0000000p+1", "nll": "0x1.b18c120000000p-2", "penalty": "0x1.25a0e80000000p-9",
         "pseudo_label": "0x1.75d3200000000p-2", "adversary": "0x1.666c900000000p-1"},
        {"loss": "0x1.9506860000000p+0", "nll": "0x1.0e48780000000p-2", "penalty": "0x1.3c3c040000000p-7",
         "pseudo_label": "0x1.a5d27e0000000p-3", "adversary": "0x1.3eb36e0000000p-1"},
        {"loss": "0x1.f1bdc60000000p-1", "nll": "0x1.2455da0000000p-3", "penalty": "0x1.b15c000000000p-6",
         "pseudo_label": "0x1.1668a20000000p-4", "adversary": "0x1.ce9c6c0000000p-2"},
    ],
    "recipes/textured_digits.toml": [
        {"loss": "0x1.3f38c80000000p+1", "nll": "0x1.8fc2ea0000000p-1", "penalty": "0x1.fe50540000000p-6",
         "pseudo_label": "0x1.37c7fc0000000p-2", "adversary": "0x1.8981ba0000000p-1"},
        {"loss": "0x1.3212b80000000p+1", "nll": "0x1.65b7ea0000000p-1", "penalty": "0x1.8cf72c0000000p-6",
         "pseudo_label": "0x1.4a63960000000p-2", "adversary": "0x1.7e46540000000p-1"},
        {"loss": "0x1.cad85c0000000p+0", "nll": "0x1.e48fb60000000p-2", "penalty": "0x1.1fc3580000000p-6",
         "pseudo_label": "0x1.ab80dc0000000p-3", "adversary": "0x1.7068520000000p-1"},
        {"loss": "0x1.b55ddc0000000p+0", "nll": "0x1.83517e0000000p-2", "penalty": "0x1.e073c80000000p-7",
         "pseudo_label": "0x1.bce5200000000p-3", "adversary": "0x1.5dd0880000000p-1"},
    ],
}
"""The one-concept method's loss terms, which the figures of docs/RESULTS.md rest on, recorded with torch 2.14.1 on
a 2-core AMD EPYC. Float kernels differ in their last bits between CPUs and torch builds (an Intel Xeon differs by at
most 2e-6 relative), so they must match to 1e-5 relative or 1e-7 absolute (the first steps' penalties are near
1e-5); a change to the method moves them by far more."""


def _trainer(tmp_path, recipe: str, *sets: str):
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    return Trainer(load_recipe(recipe, [*TINY, *sets]), tmp_path, progress=False)


def _fixed_step(t):
    """16 training images and one stream batch, which every later ``next_unlabeled`` returns again, with the
    model's class probabilities of that stream batch (computed beside the step, as the step computes them)."""
    split = t.bundle.splits["train"]
    batch = {"images": split.images[:16], "labels": split.labels[:16], "attrs": split.attrs[:16]}
    stream_batch = t.next_unlabeled()
    t.next_unlabeled = lambda: stream_batch
    with torch.no_grad():
        p = t.model(torch.cat([batch["images"], stream_batch[0]]))[16:].softmax(-1)
    return batch, stream_batch, p


@pytest.mark.parametrize("recipe", sorted(ONE_CONCEPT_TERMS))
def test_one_spurious_concept_trains_as_the_one_concept_method(tmp_path, recipe):
    torch.set_num_threads(2)
    t = _trainer(tmp_path, recipe, "concept.pseudo_label_start=0", "concept.pseudo_label_threshold=0.5")
    assert len(t.method.concepts) == 1 and len(t.method.adversaries) == 1
    t.epoch = 0
    t.method.on_epoch_start(0)
    for i, (images, labels, attrs) in enumerate(t.train_loader(0)):
        if i == len(ONE_CONCEPT_TERMS[recipe]):
            break
        terms = t.train_step({"images": images, "labels": labels, "attrs": attrs})
        t.step += 1
        concept = t.method.concept.name
        assert terms["penalty"] == terms[f"penalty/mi_{concept}"]
        assert terms["adversary"] == terms[f"adversary/{concept}"]
        for key, value in ONE_CONCEPT_TERMS[recipe][i].items():
            want = float.fromhex(value)
            assert terms[key] == pytest.approx(want, rel=1e-5, abs=1e-7), (i, key)
    state = t.method.state_dict()  # the one-concept checkpoint keys, none of a further concept
    assert {"joint", "adversary", "graft_q", "graft_q_epoch"} <= set(state) and not any("/" in k for k in state)


def test_joint_rows_is_the_per_row_outer_product():
    a, b = torch.tensor([[0.2, 0.8], [1.0, 0.0]]), torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    j = joint_rows([a, b])
    assert j.shape == (2, 6) and torch.allclose(j.sum(1), torch.ones(2))
    assert torch.allclose(j.reshape(2, 2, 3), a[:, :, None] * b[:, None, :])  # the first concept varies slowest
    assert torch.equal(joint_rows([a]), a)


def test_a_combination_of_two_concepts_is_invisible_to_each_alone_and_seen_by_their_joint():
    """A class that is the XOR of two independent binary concepts: each concept's own MI with it is zero, the joint's
    is the class entropy (log 2): the failure ``combine = 'sum'`` cannot see."""
    c1, c2 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    y = F.one_hot(c1 ^ c2, 2).float()
    q1, q2 = F.one_hot(c1, 2).float(), F.one_hot(c2, 2).float()
    assert float(soft_mutual_information(y, q1)) == pytest.approx(0, abs=1e-6)
    assert float(soft_mutual_information(y, q2)) == pytest.approx(0, abs=1e-6)
    assert float(soft_mutual_information(y, joint_rows([q1, q2]))) == pytest.approx(math.log(2), rel=1e-5)


def test_joint_combine_penalises_the_concepts_joint_prediction(tmp_path):
    """two_nuisances at the default ``combine = 'joint'``: one MI term and one adversary over colour x background
    (four values); each concept's own MI is logged as the joint's marginal; the state is the joint term's, and a
    ``sum`` run's state is refused with the key named."""
    t = _trainer(tmp_path / "a", TWO, "concept.joint_decay=0", "concept.pseudo_label_weight=0", "concept.weight=0.5")
    method = t.method
    assert method.terms == ["color+background"] and len(method.adversaries) == 1
    assert method.adversaries[0][-1].out_features == 4
    t.epoch = 0
    method.on_epoch_start(0)
    qs = method.graft_qs
    batch, stream_batch, p = _fixed_step(t)
    terms = method.loss_terms(batch, 0)
    rows = [q[stream_batch[1]] for q in qs]
    joint_mi = soft_mutual_information(p, joint_rows(rows))
    assert float(terms["penalty"].detach()) == pytest.approx(float(joint_mi), rel=1e-4, abs=1e-7)
    assert torch.equal(terms["penalty"], terms["penalty/mi_color+background"])
    for concept, q in zip(("color", "background"), rows):  # the marginals: each concept's own MI, logged
        own = float(soft_mutual_information(p, q))
        assert float(terms[f"penalty/mi_{concept}"]) == pytest.approx(own, rel=1e-4, abs=1e-7)
        assert float(terms["penalty"].detach()) >= own - 1e-6  # the joint's MI bounds each concept's
    assert torch.equal(terms["adversary"], terms["adversary/color+background"])
    total = terms["nll"] + 0.5 * terms["penalty"] + terms["adversary"]
    assert float(terms["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    method.cfg.joint_decay = 0.5  # one running joint, class x (colour, background)
    method.loss_terms(batch, 0)
    method.commit()
    assert len(method.joints) == 1 and method.joints[0].shape == (2, 4)
    state = method.state_dict()
    assert {"joint/color+background", "adversary/color+background", "graft_q", "graft_q/background"} <= set(state)
    assert "joint" not in state and "adversary" not in state
    summed = _trainer(tmp_path / "b", TWO, "concept.combine=sum").method
    with pytest.raises(DebiasError, match="joint/color\\+background.*concept.combine = 'joint'"):
        method.load_state_dict(summed.state_dict() | {"joint": torch.zeros(2, 2), "joint/background": torch.zeros(2, 2)})


def test_sum_combine_gives_every_concept_its_own_penalty_and_adversary(tmp_path):
    """two_nuisances with ``combine = 'sum'``: the stream is read once per matching for both concepts; the loss adds
    each concept's MI and adversary loss at the same weight; the method's state keeps both and restores both."""
    t = _trainer(tmp_path / "a", TWO, "concept.joint_decay=0", "concept.pseudo_label_weight=0", "concept.weight=0.5",
                 "concept.combine=sum")
    method = t.method
    assert [c.name for c in method.concepts] == ["color", "background"] and len(method.adversaries) == 2
    own = [p for g in t.optimizer.param_groups[1:] for p in g["params"]]
    assert own == [p for a in method.adversaries for p in a.parameters()]
    t.epoch = 0
    method.on_epoch_start(0)
    stream = t.bundle.unlabeled
    qs = method.graft_qs
    assert [q.shape for q in qs] == [(len(stream), 2), (len(stream), 2)] and not torch.equal(qs[0], qs[1])
    t.net.eval()
    with torch.no_grad():  # each concept's captions read against the same graft embedding
        _, taps = t.net(stream.images[:8], taps=True)
        emb = t.graft(stream.images[:8], taps)
        for concept, q in zip(method.concepts, qs):
            assert torch.allclose(q[:8], method._softmax(emb, t.clip.encode_text(concept.captions)).cpu(), atol=1e-5)
    t.net.train()
    batch, stream_batch, p = _fixed_step(t)
    terms = method.loss_terms(batch, 0)
    for concept, q in zip(method.concepts, qs):
        mi = soft_mutual_information(p, q[stream_batch[1]])
        assert float(terms[f"penalty/mi_{concept.name}"].detach()) == pytest.approx(float(mi), rel=1e-4, abs=1e-7)
    mi_color, mi_background = (terms[f"penalty/mi_{c}"] for c in ("color", "background"))
    assert float(mi_background.detach()) > 0 and float(mi_color.detach()) > 0
    assert torch.equal(terms["penalty"], mi_color + mi_background)
    assert torch.equal(terms["adversary"], terms["adversary/color"] + terms["adversary/background"])
    total = terms["nll"] + 0.5 * terms["penalty"] + terms["adversary"]
    assert float(terms["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    # the background's adversary learns from its own concept's prediction: its gradient differs from the colour's
    grads = torch.autograd.grad(terms["adversary/background"], list(method.adversaries[1].parameters()),
                                retain_graph=True)
    assert all(g.abs().max() > 0 for g in grads)
    assert all(g is None for g in torch.autograd.grad(terms["adversary/background"],
                                                      list(method.adversaries[0].parameters()), allow_unused=True))
    method.cfg.joint_decay = 0.5  # a running joint per concept: the first batch's own joint of each
    method.loss_terms(batch, 0)
    method.commit()
    for joint, q in zip(method.joints, qs):
        assert torch.allclose(joint, p.T @ q[stream_batch[1]] / len(p), atol=1e-6)
    state = method.state_dict()
    assert {"graft_q", "graft_q/background", "adversary", "adversary/background", "joint", "joint/background"} <= set(state)
    fresh = _trainer(tmp_path / "b", TWO, "concept.joint_decay=0", "concept.pseudo_label_weight=0",
                     "concept.weight=0.5", "concept.combine=sum").method
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.graft_qs, qs)) and fresh.graft_q_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(fresh.joints, method.joints))
    for a, b in zip(fresh.adversaries, method.adversaries):
        assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    partial = {k: v for k, v in state.items() if not k.endswith("/background")}  # a one-concept run's state
    with pytest.raises(DebiasError, match="concepts.spurious"):
        fresh.load_state_dict(partial)


def test_the_joint_term_and_both_concepts_mi_are_logged(tmp_path):
    """A tiny two_nuisances run (the recipe's [concept]: running joint, adversary, self-training): the joint term's
    MI and adversary and both concepts' own MI reach TensorBoard; the run's end (evaluation, explanation) is left
    out."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    out = tmp_path / "run"
    t = Trainer(load_recipe(TWO, [*TINY, "train.epochs=1", "train.log_every=1", "selection.track_concepts=false"]),
                out, progress=False)
    t.finish = lambda train_s, stop=None: t.writer.close()  # the training loop alone
    t.fit()
    assert len(t.method.joints) == 1 and t.method.joints[0].shape == (2, 4)  # one running joint, class x joint
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/penalty", "train/penalty/mi_color+background", "train/penalty/mi_color",
                "train/penalty/mi_background", "train/adversary", "train/adversary/color+background"):
        assert tag in tags, tag
    total = [e.value for e in events.Scalars("train/penalty")]
    joint = [e.value for e in events.Scalars("train/penalty/mi_color+background")]
    assert len(total) >= 2 and total == pytest.approx(joint, rel=1e-6, abs=1e-9)
    for concept in ("color", "background"):  # each concept's own MI: never above the joint's
        own = [e.value for e in events.Scalars(f"train/penalty/mi_{concept}")]
        assert all(0 <= v <= j + 1e-6 for v, j in zip(own, joint))
    assert any(e.value > 0 for e in events.Scalars("train/penalty/mi_background"))
