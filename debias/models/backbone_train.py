"""Pretraining of the shipped backbone (:mod:`debias.models.backbone`) on the world with no shortcut.

Every step renders a fresh batch with :func:`debias.data.world.render` (32 px, digit jitter on) from
pretraining-pool digits (:func:`debias.data.base_pool.pretraining_pool`; the evaluation pool is never drawn), with
colour (8), background (4) and marker (3) uniform at random and independent of the digit. A timm CNN's pooled
features feed four linear heads (digit 10-way: timm's own classifier; colour, background, marker: extra heads), and
the loss is the sum of the four cross-entropies, so the features carry every attribute, not the digit alone.
AdamW with :func:`debias.train.schedule.warmup_cosine`. Images are normalised with the model's timm mean/std, as
:class:`debias.models.standalone.StandaloneModel` does when it fine-tunes the result.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import world
from ..data.base_pool import evaluation_pool, pretraining_pool
from ..data.digits_base import load_base_digits
from ..errors import DebiasError
from . import backbone as bb

ATTRIBUTES: dict[str, int] = {"digit": 10, "color": len(world.COLOR_NAMES), "background": len(world.BACKGROUNDS),
                              "marker": len(world.MARKERS)}
"""Attribute -> number of classes of its head."""
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3
EVAL_RENDERS = 4
"""Renders of every evaluation-pool digit in :func:`evaluate` (fixed seed, attributes random, no jitter)."""
EVAL_SEED = 12345


class MultiHead(nn.Module):
    """A timm CNN (``net``, its classifier = the digit head) plus linear colour, background and marker heads."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        width = net.num_features
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in ATTRIBUTES.items() if k != "digit"})
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.net.forward_head(self.net.forward_features((x - self.mean) / self.std), pre_logits=True)
        out = {"digit": self.net.get_classifier()(feats)}
        out.update({k: h(feats) for k, h in self.heads.items()})
        return out


def sample_attributes(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Colour, background and marker indices, each uniform over all its values and independent of the rest."""
    return {k: torch.randint(ATTRIBUTES[k], (n,), generator=gen) for k in ("color", "background", "marker")}


def render_batch(base: torch.Tensor, gen: torch.Generator, jitter: bool) -> tuple[torch.Tensor, dict]:
    """Images of the base digits ``base`` with random attributes, and every attribute's labels."""
    _, labels = load_base_digits(8)
    attrs = sample_attributes(len(base), gen)
    x = world.render(world.digit_layers(base), attrs["color"], attrs["background"], attrs["marker"], gen,
                     jitter=jitter)
    return x, {"digit": labels[base].long(), **attrs}


def evaluation_batch(renders: int = EVAL_RENDERS, seed: int = EVAL_SEED) -> tuple[torch.Tensor, dict]:
    """``renders`` images of every evaluation-pool digit (fixed seed, random attributes, no jitter)."""
    gen = torch.Generator().manual_seed(seed)
    return render_batch(evaluation_pool().repeat(renders), gen, jitter=False)


@torch.no_grad()
def evaluate(model: MultiHead, batch_size: int = 256) -> dict[str, float]:
    """Per-attribute accuracy of ``model`` on :func:`evaluation_batch` (eval mode)."""
    x, y = evaluation_batch()
    training = model.training
    model.eval()
    correct = {k: 0 for k in ATTRIBUTES}
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        for k in ATTRIBUTES:
            correct[k] += int((out[k].argmax(1) == y[k][i:i + batch_size]).sum())
    model.train(training)
    return {k: round(c / len(x), 4) for k, c in correct.items()}


def load_pretrained(folder: Path | str) -> MultiHead:
    """The backbone in ``folder`` (checksum verified, through timm's pretrained loader) with its extra heads."""
    import timm
    from safetensors.torch import load_file

    weights = bb.verify_checksum(folder)
    net = timm.create_model(bb.ARCH, num_classes=bb.DIGIT_CLASSES, pretrained=True,
                            pretrained_cfg_overlay=bb.pretrained_overlay(weights))
    model = MultiHead(net)
    heads = Path(folder) / bb.HEADS_FILE
    if not heads.is_file():
        raise DebiasError(f"pretraining heads missing: {heads}; {bb.REGENERATE_HINT}")
    model.heads.load_state_dict({k: v.float() for k, v in load_file(str(heads)).items()})
    return model


def machine() -> str:
    """The CPU model and core count (and the GPU, when training on one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def save(model: MultiHead, folder: Path) -> str:
    """Write the timm model's weights (float16, timm's key names), the checksum and the extra heads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.net.state_dict().items()}
    save_file(state, str(folder / bb.WEIGHTS_FILE), metadata={"format": "pt", "arch": bb.ARCH})
    heads = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(heads, str(folder / bb.HEADS_FILE), metadata={"format": "pt"})
    for name in (bb.WEIGHTS_FILE, bb.HEADS_FILE):
        (folder / name).chmod(0o644)  # safetensors creates the file owner-only; it is package data
    return bb.write_checksum(folder)


def pretrain(out: Path, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
             weight_decay: float = 0.05, warmup: int | None = None, seed: int = 0, num_threads: int = 2,
             progress: bool = True) -> dict:
    """Pretrain, save into ``out`` (weights, checksum, heads, ``training.json``) and return the summary."""
    import timm
    from tqdm import tqdm

    from ..train.schedule import warmup_cosine

    if steps < 1:
        raise ValueError(f"steps = {steps}; expected at least 1")
    t_start = time.perf_counter()
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    model = MultiHead(timm.create_model(bb.ARCH, num_classes=bb.DIGIT_CLASSES))
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, steps, warmup)
    pool = pretraining_pool()
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    step_times: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="pretrain backbone", disable=not progress, dynamic_ncols=True)
    t_train = time.perf_counter()
    for _ in bar:
        t0 = time.perf_counter()
        while len(order) < batch_size:  # epochs over the pretraining pool, each in a fresh order
            order = torch.cat([order, pool[torch.randperm(len(pool), generator=gen)]])
        base, order = order[:batch_size], order[batch_size:]
        x, y = render_batch(base, gen, jitter=True)
        out_ = model(x)
        loss = sum(F.cross_entropy(out_[k], y[k]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        step_times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
    train_s = time.perf_counter() - t_train
    digest = save(model, out)
    figures = evaluate(load_pretrained(out))  # the shipped (float16) weights, loaded as a user loads them
    summary = {
        "arch": bb.ARCH, "image_size": world.IMAGE_SIZE, "evaluation_accuracy": figures,
        "evaluation_images": len(evaluation_pool()) * EVAL_RENDERS,
        "evaluation": "evaluation-pool digits, every attribute random, no jitter",
        "training_data": "pretraining-pool digits, every attribute uniform at random, digit jitter on",
        "objective": "sum of cross-entropies: digit 10, color 8, background 4, marker 3 (heads on pooled features)",
        "steps": steps, "batch_size": batch_size, "epochs_of_pool": round(steps * batch_size / len(pool), 2),
        "lr": lr, "warmup": warmup, "weight_decay": weight_decay, "seed": seed, "num_threads": num_threads,
        "final_loss_mean_last_50": round(statistics.fmean(losses[-50:]), 4),
        "step_s_median": round(statistics.median(step_times), 4), "train_wall_time_s": round(train_s, 1),
        "total_wall_time_s": round(time.perf_counter() - t_start, 1), "machine": machine(),
        "weights_dtype": "float16", "weights_bytes": (out / bb.WEIGHTS_FILE).stat().st_size,
        "weights_sha256": digest, "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
