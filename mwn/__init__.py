"""mwn: Meta-Weight-Net sample reweighting with exact meta-gradients, in pure torch.func.

As a library (mwn.api): `MetaReweighter` for a model and a torch.optim optimiser in your own
training loop; the functional core (`hyperparams`, `init_state`, `step_fn`, `adopt`) whose step
is a pure function of explicit state, vmappable over runs.

Layers, each importing only what it stands on: mwn.core (one iteration as pure functions of
explicit state), mwn.data (files to device-resident seeded batches), mwn.run (one run or a
vectorised group and its folder), mwn.report (reading run folders back), mwn.api (the library).
Entry points: python -m mwn.train | report | compare | bench.
"""

from mwn.api import (
    LayerError,
    MetaReweighter,
    SettingError,
    adopt,
    hyperparams,
    init_state,
    step_fn,
)
from mwn.core.methods import METHODS
from mwn.core.models import MetaNet
from mwn.core.step import StepHP

__all__ = [
    "METHODS",
    "LayerError",
    "MetaNet",
    "MetaReweighter",
    "SettingError",
    "StepHP",
    "adopt",
    "hyperparams",
    "init_state",
    "step_fn",
]
