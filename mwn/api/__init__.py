"""The library: the exact meta-weighting step for any model, at two levels.

- `MetaReweighter(model, optimizer, ...)`: a stateful step for an nn.Module and a torch.optim
  optimiser inside the user's own training loop.
- The functional core: `hyperparams`, `init_state`, `step_fn` (a pure function of state and
  batches, vmappable over runs), `adopt` (any module's batch norm given the step's rules).
"""

from mwn.api.functional import hyperparams, init_state, step_fn
from mwn.api.reweighter import MetaReweighter, SettingError
from mwn.core.adopt import LayerError, adopt

__all__ = [
    "LayerError",
    "MetaReweighter",
    "SettingError",
    "adopt",
    "hyperparams",
    "init_state",
    "step_fn",
]
