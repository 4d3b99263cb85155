"""One MWN iteration cut into its stages, each timed (`python -m mwn.bench --profile`).

`staged_iteration` is mwn.core.meta.mwn_step (fp32, one process) written out stage by stage with
a `mark(name)` call after each, so that a clock can stand between them; a test holds it to the
real step bit for bit. The stages, in the order one iteration runs them:

    forward_vjp       the training batch's forward, recording its VJP (losses L_i(w))
    weights           the meta-net's weights V(L_i; Theta) and their VJP
    weighted_pull     grad_w (1/n) sum_i v_i L_i(w): the training batch's backward
    lookahead         the optimiser's step to w' and its scale D
    meta_grad         forward and backward of the meta batch at w'
    dots              (D g) . grad L_i(w) for every i: the tangent pass on the saved activations
                      (or a whole JVP), or two forwards (finite_difference)
    weights_pullback  the chain rule through V down to Theta
    adam              the meta-net's Adam step
    rollback          the weights of the new meta-net and the classifier's step on them (a second
                      backward of the training batch); without roll back the lookahead is kept
    rest              buffers and the metrics' means

Each stage is reported in ms and as a multiple of `forward`: one plain forward of the training
batch in training mode (no VJP recorded), timed in the same rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.func import vjp

from mwn.core.meta import difference_dots, training_forward
from mwn.core.optim import adam_step
from mwn.core.step import (
    StepHP,
    loss_dots,
    mean_loss,
    per_sample_loss,
    run_constants,
    sample_weights,
    scaled_tangent,
)
from mwn.core.sums import LOCAL

STAGES = (
    "forward_vjp",
    "weights",
    "weighted_pull",
    "lookahead",
    "meta_grad",
    "dots",
    "weights_pullback",
    "adam",
    "rollback",
    "rest",
)
DOTS = {"jvp": loss_dots, "finite_difference": difference_dots}


def staged_iteration(
    model, meta_net, state: dict, batch, meta_batch, lr: float, hp: StepHP, mark: Callable
) -> tuple[dict, dict]:
    """mwn_step (fp32, one process, meta_grad jvp or finite_difference), calling mark(stage)
    as each stage ends. Returns what mwn_step returns."""
    if hp.meta_grad not in DOTS or hp.fp16 or hp.bf16:
        raise ValueError(
            f"meta_grad={hp.meta_grad}: the profile takes jvp | finite_difference, fp32"
        )
    (_, y), (xm, ym) = batch, meta_batch
    params, buffers, constants = state["params"], state["buffers"], run_constants(state)
    sums, n = hp.sums(state, LOCAL), y.shape[0]
    losses, pullback, new_buffers, saved = training_forward(model, state, batch, hp)
    mark("forward_vjp")
    weights, weights_pullback = vjp(
        lambda th: sample_weights(meta_net, th, losses, y, constants, hp.normalize_weights),
        state["meta_params"],
    )
    mark("weights")
    g_train = sums.pull(pullback, weights, n)
    mark("weighted_pull")
    *ahead, a = hp.update_and_scale(params, g_train, state["momentum"], lr)
    mark("lookahead")
    g_meta, meta_loss = sums.grad_of_mean(lambda p: mean_loss(model, p, buffers, xm, ym), ahead[0])
    mark("meta_grad")
    tangent, a = scaled_tangent(g_meta, a)
    jg, t = DOTS[hp.meta_grad](model, params, buffers, batch, tangent, hp, sums, saved)
    mark("dots")
    (meta_grad,) = weights_pullback(jg * (-a / n) / t)
    meta_grad = sums.total(meta_grad)
    mark("weights_pullback")
    meta_params, meta_opt = adam_step(
        state["meta_params"], meta_grad, state["meta_opt"], hp.meta_lr,
        weight_decay=hp.meta_weight_decay,
    )  # fmt: skip
    mark("adam")
    if hp.rollback:
        weights = sample_weights(meta_net, meta_params, losses, y, constants, hp.normalize_weights)
        new_params, momentum = hp.update(
            params, sums.pull(pullback, weights, n), state["momentum"], lr
        )
    else:
        new_params, momentum = ahead
    mark("rollback")
    new_state = {
        **state,
        "params": new_params,
        "buffers": LOCAL.buffers(new_buffers),
        "momentum": momentum,
        "meta_params": meta_params,
        "meta_opt": meta_opt,
    }
    means = sums.global_means([losses.mean(), (weights * losses).mean(), weights.mean()])
    norm = torch.stack([g.square().sum() for g in meta_grad.values()]).sum().sqrt()
    metrics = {
        "loss": means[0],
        "weighted_loss": means[1],
        "meta_loss": meta_loss,
        "mean_weight": means[2],
        "meta_grad_norm": norm,
    }
    mark("rest")
    return new_state, metrics


class Clock:
    """Milliseconds between marks (the device synchronised at each), and their total."""

    def __init__(self, sync: Callable) -> None:
        self.sync, self.ms = sync, {}
        sync()
        self.t0 = self.last = time.perf_counter()

    def mark(self, stage: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.ms[stage], self.last = 1000 * (now - self.last), now
        self.ms["total"] = 1000 * (now - self.t0)


def profile(
    model, meta_net, state, batch, meta_batch, lr, hps: dict[str, StepHP], rounds: int,
    warmup: int, sync: Callable,
) -> dict:  # fmt: skip
    """Each named setting's stages over `warmup + rounds` rounds, the settings (and one plain
    forward of the training batch) interleaved in rotating order; medians, min and max in ms,
    and each stage's median over the forward's."""
    x, y = batch
    names = list(hps)
    times = {name: {s: [] for s in (*STAGES, "total")} for name in names}
    forward = []
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            clock = Clock(sync)
            staged_iteration(model, meta_net, state, batch, meta_batch, lr, hps[name], clock.mark)
            if r >= warmup:
                for s, ms in clock.ms.items():
                    times[name][s].append(ms)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            per_sample_loss(model, state["params"], state["buffers"], x, y)
        sync()
        if r >= warmup:
            forward.append(1000 * (time.perf_counter() - t0))
    unit = statistics.median(forward)
    out = {"forward_ms": unit, "forward_ms_range": [min(forward), max(forward)], "settings": {}}
    for name in names:
        rows = {}
        for s, v in times[name].items():
            med = statistics.median(v)
            rows[s] = {"ms": med, "min": min(v), "max": max(v), "forwards": med / unit}
        out["settings"][name] = rows
    return out


def print_profile(report: dict, rounds: int) -> None:
    names = list(report["settings"])
    print(
        f"stages of one iteration, median of {rounds} interleaved rounds, in ms and in forwards "
        f"of the training batch (one forward: {report['forward_ms']:.2f} ms)"
    )
    head = "".join(f"{n:>26s}" for n in names)
    print(f"{'stage':18s}{head}")
    for s in (*STAGES, "total"):
        cells = ""
        for n in names:
            row = report["settings"][n][s]
            cells += f"{row['ms']:9.2f} ({row['min']:.1f}-{row['max']:.1f}) {row['forwards']:5.2f}x"
        print(f"{s:18s}{cells}")
