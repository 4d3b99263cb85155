"""Any nn.Module as a classifier of the exact meta-weighting step: its batch norm layers take the
project's rules (mwn.core.batchnorm: autocast, forward mode, synchronised), in place, and a layer
the exact meta-gradient cannot treat correctly is refused in one line naming it.

The meta-gradient runs the training batch through the classifier twice at the same parameters:
once with its VJP, once with a forward-mode JVP, and takes dot products of the two. A layer
that draws random numbers (dropout, stochastic depth) would draw a different mask in each pass
and the dot products would mix two different networks, so such a layer must be off (p = 0, or
the layer in eval mode) while the step runs.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mwn.core.batchnorm import OURS, SYNCED


class LayerError(ValueError):
    """A layer of the model the step cannot treat exactly; the message names it."""


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUTS += (nn.FeatureAlphaDropout,)
# stochastic depth by class name and attribute: timm's DropPath, torchvision's StochasticDepth
_DROP_PATHS = {"DropPath": "drop_prob", "StochasticDepth": "p"}


def adopt(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """`model` itself, its torch batch norm layers now the project's (nn.BatchNorm1d/2d/3d and
    nn.SyncBatchNorm; the same objects, parameters and buffers: an optimiser built on the model
    keeps working), synchronised over torchrun's ranks with `sync_bn`. A subclass of torch's
    batch norm with its own forward is left alone, or refused with `sync_bn` (its statistics
    would stay per process)."""
    for name, module in model.named_modules():
        kind = type(module)
        if kind in OURS:
            module.__class__ = kind = OURS[kind]
        if sync_bn and kind in SYNCED:
            module.__class__ = SYNCED[kind]
        elif sync_bn and isinstance(module, _BatchNorm) and kind not in SYNCED.values():
            raise LayerError(
                f"layer {name!r} ({kind.__name__}): sync_bn synchronises torch's BatchNorm1d/2d/3d"
                " and SyncBatchNorm, not a subclass with its own forward"
            )
    return model


def random_layers(model: nn.Module) -> list[str]:
    """The layers that draw random numbers in the model's current mode, by name."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        p = _DROP_PATHS.get(type(module).__name__)
        if isinstance(module, _DROPOUTS):
            p = "p"
        elif isinstance(module, nn.MultiheadAttention):
            p = "dropout"
        if p is not None and float(getattr(module, p, 0.0) or 0.0) > 0:
            found.append(f"{name or 'model'} ({type(module).__name__}, {p}={getattr(module, p)})")
    return found


def check_deterministic(model: nn.Module) -> None:
    """Refuse, in one line, a model whose forward draws random numbers where it can be seen."""
    found = random_layers(model)
    if found:
        raise LayerError(
            f"layer {found[0]} draws random numbers, so the meta-gradient's two passes of the "
            f"training batch would see different masks ({len(found)} such layer"
            f"{'s' if len(found) > 1 else ''}); set it to 0 or put that layer in eval mode"
        )
