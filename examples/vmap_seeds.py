"""The functional step vmapped over seeds: K runs of the built-in ResNet32 trained as one, each
with its own initialisation, on the same batches (the command line's `hydra/launcher=vmap`
does this with each run's own data and run folder). Usage: python examples/vmap_seeds.py [K]"""

import sys

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

import mwn
from mwn.core.models import ResNet

K = int(sys.argv[1]) if len(sys.argv) > 1 else 4
ITERATIONS, CLASSES = int(sys.argv[2]) if len(sys.argv) > 2 else 100, 10

hp = mwn.hyperparams(meta_lr=1e-3)  # the command line's defaults, changed where named
states = []
for seed in range(K):  # each run: its own initial classifier and meta-net
    torch.manual_seed(seed)
    model, meta_net = ResNet(CLASSES, depth=32, width=16), mwn.MetaNet(100, init="flat")
    states.append(mwn.init_state(model, meta_net, hp))
state = tree_map(lambda *leaves: torch.stack(leaves), *states)  # one leading run dimension
step = vmap(mwn.step_fn(model, meta_net, hp), in_dims=(0, None, None, None), randomness="error")

gen = torch.Generator().manual_seed(0)
for it in range(ITERATIONS):  # stand-in data: use your own batches here
    x, y = (
        torch.randn(100, 3, 32, 32, generator=gen),
        torch.randint(0, CLASSES, (100,), generator=gen),
    )
    xm, ym = (
        torch.randn(100, 3, 32, 32, generator=gen),
        torch.randint(0, CLASSES, (100,), generator=gen),
    )
    state, metrics = step(state, (x, y), (xm, ym), 0.1)
    print(f"iter {it + 1}  loss per run {[round(v, 3) for v in metrics['loss'].tolist()]}")
