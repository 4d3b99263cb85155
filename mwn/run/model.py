"""The classifier of a run from its `model` settings: a built-in (mwn.core.models.CLASSIFIERS by
`arch`, `depth`, `width`) or any nn.Module by Hydra's `_target_` (a class or factory, called with
`args` and the data's number of classes), adopted for the exact step (mwn.core.adopt) and tried
once on a batch of the data's shape, so that a model that does not fit the data stops with one
line naming it instead of a traceback mid-run."""

from __future__ import annotations

import inspect

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mwn.config import ConfigError
from mwn.core.adopt import LayerError, adopt, check_deterministic
from mwn.core.models import build_classifier


def model_name(model: DictConfig) -> str:
    """A short name, the same in the log and summary.json: a built-in's preset name (resnet32,
    wrn28_10: depth and widen factor), else the target's last part (resnet18) or timm's
    model_name."""
    if model._target_ is None:
        widen = f"_{model.width // 16}" if model.arch == "wrn" else ""
        return f"{model.arch}{model.depth}{widen}"
    name = model.args.get("model_name") if model.args else None
    return str(name or model._target_.rsplit(".", 1)[-1])


def build_model(model: DictConfig, num_classes: int, image_shape: tuple[int, ...]) -> nn.Module:
    """The classifier on the CPU (the caller moves it), with its random initialisation drawn
    from the global RNG as a built-in's is."""
    if model._target_ is None:
        c = image_shape[0]
        return build_classifier(str(model.arch), num_classes, c, model.depth, model.width)
    target = model._target_
    try:
        factory = get_object(target)
    except Exception:
        module, _, attr = target.rpartition(".")
        raise ConfigError(
            f"model._target_={target}: cannot be imported (is {attr!r} importable from "
            f"{module!r}, and the package on the path?)"
        ) from None
    args = OmegaConf.to_container(model.args, resolve=True) if model.args else {}
    if takes(factory, "num_classes"):
        given = args.setdefault("num_classes", num_classes)
        if given != num_classes:
            raise ConfigError(f"model.args.num_classes={given}: the data has {num_classes} classes")
    try:
        net = factory(**args)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"model._target_={target}: calling it with {args} failed: {type(e).__name__}: {first}"
        ) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model._target_={target}: made a {type(net).__name__}, not an nn.Module")
    try:
        adopt(net)
        check_deterministic(net)
    except LayerError as e:
        raise ConfigError(f"model._target_={target}: {e}") from None
    try_on(net, target, num_classes, image_shape)
    return net


def takes(factory, name: str) -> bool:
    """Whether the class or function accepts a keyword `name` (or any keyword)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def try_on(net: nn.Module, target: str, num_classes: int, image_shape: tuple[int, ...]) -> None:
    """One forward of two images of the data's shape, in eval mode (nothing learned changes):
    logits (2, num_classes) or a one-line refusal."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *image_shape))
    except Exception as e:
        shape = "x".join(map(str, image_shape))
        raise ConfigError(
            f"model._target_={target}: fails on the data's {shape} images: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model._target_={target}: gives {got} for 2 images; the step needs logits "
            f"(2, {num_classes}) for the data's {num_classes} classes"
        )
