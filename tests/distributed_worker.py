"""Run by tests/test_distributed.py under torchrun (gloo, CPU): a few iterations of each case
on this rank's shards of the global batches, in float64, through the real step functions and
`AllReduce`. Saves this rank's state after every iteration to <out>/rank<r>.pt.

`make_case` is also what the test uses to compute the one-process reference.
"""

from __future__ import annotations

import sys

import torch

from mwn.core.batchnorm import synchronised
from mwn.core.methods import METHODS
from mwn.core.models import ClassAwareMetaNet, MetaNet, ResNet, extract_state
from mwn.core.optim import adam_init
from mwn.core.sums import LOCAL, AllReduce
from mwn.run.ranks import process_group, ranks_from_env

from conftest import step_hp

STEP_FUNCTIONS = {name: m.step for name, m in METHODS.items()}

STEPS, BATCH, META_BATCH, LR = 3, 8, 6, 0.3
CASES = {  # name: (method, sync_bn, hyperparameters)
    "mwn_sync_normalized": ("mwn", True, step_hp(weight_decay=5e-3, normalize_weights=True)),
    "mwn_sync_nesterov_no_rollback": (
        "mwn",
        True,
        step_hp(weight_decay=5e-3, nesterov=True, rollback=False, meta_lr=1e-2),
    ),
    "erm_sync": ("erm", True, step_hp(weight_decay=5e-3, normalize_weights=False)),
    "mwn_local_bn": ("mwn", False, step_hp(weight_decay=5e-3, normalize_weights=True)),
    "cmw_sync_normalized": ("mwn", True, step_hp(weight_decay=5e-3, normalize_weights=True)),
    "erm_local_bn": ("erm", False, step_hp(weight_decay=5e-3, normalize_weights=False)),
}


def make_case(seed: int = 0, meta: str = "mlp"):
    """A small float64 ResNet with BatchNorm, a meta-net (MW-Net's, or CMW-Net's with class
    groups of made-up counts), their state, and STEPS global (batch, meta batch) pairs."""
    torch.manual_seed(seed)
    model = ResNet(5, depth=8, width=4, in_channels=1).double()
    meta_net = (MetaNet(7) if meta == "mlp" else ClassAwareMetaNet(7, 1, groups=3)).double()
    params, buffers = extract_state(model)
    meta_params, _ = extract_state(meta_net)
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": {k: 0.1 * torch.randn_like(v) for k, v in params.items()},
        "meta_params": meta_params,
        "meta_opt": adam_init(meta_params),
        **(meta_net.constants([50, 40, 10, 8, 1]) if meta == "cmw" else {}),
    }
    data = lambda n: (torch.randn(n, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (n,)))
    batches = [(data(BATCH), data(META_BATCH)) for _ in range(STEPS)]
    return model, meta_net, state, batches


def run(case: str, rows=slice(None), meta_rows=slice(None), reduce=LOCAL) -> list[dict]:
    """The case's STEPS iterations on the given rows of each global batch; state after each."""
    method, sync_bn, hp = CASES[case]
    model, meta_net, state, batches = make_case(meta="cmw" if case.startswith("cmw") else "mlp")
    if sync_bn and reduce is not LOCAL:
        model = synchronised(model)
    step = STEP_FUNCTIONS[method]
    states = []
    for (x, y), (xm, ym) in batches:
        batch, meta_batch = (x[rows], y[rows]), (xm[meta_rows], ym[meta_rows])
        state, metrics = step(model, meta_net, state, batch, meta_batch, LR, hp, reduce=reduce)
        states.append({"state": state, "metrics": metrics})
    return states


def reweighter_run(rows=slice(None), meta_rows=slice(None), sync_bn: bool = False) -> list:
    """torchvision's resnet18 through mwn.MetaReweighter (its BatchNorm adopted, synchronised
    with sync_bn), float64, on the given rows of each global batch: the model's state_dict after
    each iteration."""
    import torchvision

    import mwn

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    meta_net = MetaNet(7).double()
    meta_opt = torch.optim.Adam(meta_net.parameters(), lr=1e-2)
    rw = mwn.MetaReweighter(model, opt, meta_net, meta_opt, sync_bn=sync_bn)
    gen = torch.Generator().manual_seed(1)
    data = lambda n: (
        torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64),
        torch.randint(0, 5, (n,), generator=gen),
    )
    out = []
    for _ in range(2):
        (x, y), (xm, ym) = data(BATCH), data(META_BATCH)
        rw.step(x[rows], y[rows], xm[meta_rows], ym[meta_rows])
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


if __name__ == "__main__":
    ranks = ranks_from_env()
    with process_group(ranks):
        out = {}
        for case, (_, sync_bn, _) in CASES.items():
            reduce = AllReduce(ranks.world, sync_bn)
            out[case] = run(case, ranks.shard(BATCH), ranks.shard(META_BATCH), reduce)
        for sync_bn in (True, False):
            shards = ranks.shard(BATCH), ranks.shard(META_BATCH)
            out[f"reweighter_sync_bn={sync_bn}"] = reweighter_run(*shards, sync_bn=sync_bn)
        torch.save(out, f"{sys.argv[1]}/rank{ranks.rank}.pt")
