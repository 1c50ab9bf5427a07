"""The one warmup-cosine schedule that the trainer and the digits CLIP's training share."""

import math

import torch

from debias.train.schedule import warmup_cosine, warmup_cosine_factor


def test_warmup_then_cosine_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2)
    rates = []
    for _ in range(12):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:2] == [1.0, 2.0]  # (step + 1) / warmup
    assert math.isclose(rates[6], 1.0)  # half-way through the cosine
    assert rates[2] > rates[5] > rates[9] > 0
    assert rates[10] == rates[11] == 0.0  # stays at zero past the end


def test_no_warmup_starts_at_full_rate():
    assert warmup_cosine_factor(0, 100, 0) == 1.0
    assert isinstance(warmup_cosine_factor(50, 100, 5), float)
