"""mwn: Meta-Weight-Net sample reweighting with exact meta-gradients, in pure torch.func.

As a library (mwn.api): `MetaReweighter` for a model and a torch.optim optimiser in your own
training loop; the functional core (`hyperparams`, `init_state`, `step_fn`, `adopt`) whose step
is a pure function of explicit state, vmappable over runs.

Layers, each importing only what it stands on: mwn.core (one iteration as pure functions of
explicit state), mwn.data (files to device-resident seeded batches), mwn.run (one run or a
vectorised group and its folder), mwn.report (reading run folders back), mwn.api (the library).
`load_model(run_dir)`: a finished run's classifier, in eval mode.
Entry points: python -m mwn.train | predict | weights | report | compare | bench.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it; imported on first use, so that `python -m mwn.train`,
# `mwn.report` and `mwn.compare` start without importing the library's parts they do not use
_EXPORTS = {
    "LayerError": "mwn.core.adopt",
    "METHODS": "mwn.core.methods",
    "MetaNet": "mwn.core.models",
    "MetaReweighter": "mwn.api.reweighter",
    "SettingError": "mwn.api.reweighter",
    "StepHP": "mwn.core.step",
    "adopt": "mwn.core.adopt",
    "hyperparams": "mwn.api.functional",
    "init_state": "mwn.api.functional",
    "load_model": "mwn.run.trained",
    "step_fn": "mwn.api.functional",
}
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
    "load_model",
    "step_fn",
]

if TYPE_CHECKING:
    from mwn.api.functional import hyperparams, init_state, step_fn
    from mwn.api.reweighter import MetaReweighter, SettingError
    from mwn.core.adopt import LayerError, adopt
    from mwn.core.methods import METHODS
    from mwn.core.models import MetaNet
    from mwn.core.step import StepHP
    from mwn.run.trained import load_model


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mwn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
