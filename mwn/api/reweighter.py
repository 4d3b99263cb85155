"""`MetaReweighter`: the exact meta-weighting step for an nn.Module and a torch.optim optimiser,
inside the user's own training loop.

Each `step` reads the optimisers' settings from their param groups (so a learning-rate scheduler
works unchanged), gathers the module's parameters and buffers and the optimisers' states into
the functional state (mwn.core.step), runs the same pure step function as the command line, and
writes the new values back in place: into the module's parameters and buffers, into
`optimizer.state` and `meta_optimizer.state` under torch.optim's own keys, so that
`state_dict()` checkpoints keep working.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mwn.core.adopt import adopt, check_deterministic
from mwn.core.meta import META_GRADS
from mwn.core.methods import METHODS, Schedule
from mwn.core.models import MetaNet
from mwn.core.optim import adam_init
from mwn.core.step import StepHP, per_sample_loss, sample_weights
from mwn.core.sums import LOCAL, AllReduce, scaler_init

AMPS = (None, "bf16", "fp16")
# the meta-net's Adam: the rule of mwn.core.optim.adam_step with its default betas and eps
META_BETAS, META_EPS = (0.9, 0.999), 1e-8


class SettingError(ValueError):
    """A setting of the optimiser or the reweighter the exact step cannot honour."""


class MetaReweighter:
    """Meta-weighted training steps for `model`, trained by `optimizer`.

    model           any nn.Module mapping a batch of inputs to logits; its batch norm layers
                    are adopted in place (mwn.core.adopt), its random layers refused
    optimizer       torch.optim.SGD (dampening 0), Adam or AdamW (amsgrad off) over the
                    model's parameters, one setting for all of them; parameters it does not
                    hold are constants of the step
    meta_net        the weighting net, called as meta_net(loss, label, constants); default
                    mwn.MetaNet(100, init="flat") on the model's device (method=mwn only)
    meta_optimizer  torch.optim.Adam over meta_net's parameters (default: lr 1e-5, as the
                    paper's long-tail setting)
    method          as the command line's `method`: mwn | l2rw | erm | focal | class_balanced
    class_counts    training images per class (method=class_balanced, or a meta-net that
                    reads them)
    amp             None | "bf16" | "fp16" (CUDA; dynamic loss scaling, kept here)
    sync_bn         batch statistics of the global batch under torch.distributed
    The rest are the command line's settings of the same names.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta_net: nn.Module | None = None,
        meta_optimizer: torch.optim.Optimizer | None = None,
        method: str = "mwn",
        *,
        rollback: bool = True,
        normalize_weights: bool = True,
        meta_interval: int = 1,
        meta_start: int = 0,
        meta_grad: str = "jvp",
        finite_difference_eps: float = 0.01,
        amp: str | None = None,
        class_counts: list[int] | None = None,
        focal_gamma: float = 1.0,
        class_balanced_beta: float = 0.9999,
        sync_bn: bool = False,
    ) -> None:
        choose("method", method, tuple(METHODS))
        choose("meta_grad", meta_grad, tuple(META_GRADS))
        choose("amp", amp, AMPS)
        if not 0 < finite_difference_eps < float("inf"):
            raise SettingError(
                f"finite_difference_eps={finite_difference_eps}: allowed values are finite "
                "real numbers > 0"
            )
        if meta_interval < 1:
            raise SettingError(f"meta_interval={meta_interval}: allowed values are integers >= 1")
        self.method = METHODS[method]
        if meta_interval > 1 and self.method.between is None:
            raise SettingError(f"meta_interval={meta_interval}: method={method} takes 1")
        if meta_start < 0 or (meta_start and not self.method.meta_net):
            takes = "integers >= 0" if self.method.meta_net else f"0 with method={method}"
            raise SettingError(f"meta_start={meta_start}: allowed values are {takes}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise SettingError(
                "model: a DistributedDataParallel wrapper; pass model.module (the step sums "
                "gradients over the ranks itself)"
            )
        distributed = dist.is_available() and dist.is_initialized()
        if sync_bn and not distributed:
            raise SettingError("sync_bn=True: needs torch.distributed to be initialised")
        self.model = adopt(model, sync_bn=sync_bn)
        self.optimizer = optimizer
        self.kind = optimizer_kind(optimizer)
        self.names = parameter_names(model, optimizer, "optimizer")
        device = next(iter(self.names)).device
        self.meta_net = self.meta_optimizer = None
        if self.method.meta_net:
            if meta_net is None:
                dtype = next(iter(self.names)).dtype
                meta_net = MetaNet(100, init="flat").to(device=device, dtype=dtype)
            self.meta_net = meta_net
            self.meta_optimizer = meta_optimizer or torch.optim.Adam(
                self.meta_net.parameters(), lr=1e-5
            )
            if type(self.meta_optimizer) is not torch.optim.Adam:
                raise SettingError(
                    f"meta_optimizer={type(self.meta_optimizer).__name__}: allowed: "
                    "torch.optim.Adam (the meta-net's update rule)"
                )
            self.meta_names = parameter_names(self.meta_net, self.meta_optimizer, "meta_optimizer")
        self.settings = dict(
            rollback=rollback,
            normalize_weights=normalize_weights,
            meta_grad=meta_grad,
            finite_difference_eps=finite_difference_eps,
            fp16=amp == "fp16",
            bf16=amp == "bf16",
            focal_gamma=focal_gamma,
            class_balanced_beta=class_balanced_beta,
        )
        self.schedule = Schedule(meta_interval, meta_start)  # 0 without a meta-net (refused above)
        self.reduce = LOCAL
        if distributed and dist.get_world_size() > 1:
            self.reduce = AllReduce(dist.get_world_size(), sync_bn)
        self.constants = {}
        if class_counts is not None or self.method.has_constants:
            if class_counts is None:
                raise SettingError(f"class_counts: required with method={method}")
            counts = [int(c) for c in class_counts]
            self.constants = self.method.constants(counts, self.hyperparameters())
            if self.meta_net is not None and hasattr(self.meta_net, "constants"):
                self.constants.update(self.meta_net.constants(counts))
            self.constants = {k: v.to(device) for k, v in self.constants.items()}
        self.scaler = scaler_init(device=device) if amp == "fp16" else None
        self.iteration = 0

    # ------------------------------------------------------------ the step

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_meta: torch.Tensor | None = None,
        y_meta: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One iteration on the training batch (x, y) and, for a method that learns from the
        meta set, the meta batch (x_meta, y_meta); under torch.distributed each process gives
        its shard of the global batches. Returns the step's metrics (0-dim tensors)."""
        if self.method.meta_batch and (x_meta is None or y_meta is None):
            raise SettingError("x_meta, y_meta: a meta batch is needed by this method")
        check_deterministic(self.model)
        hp = self.hyperparameters()
        lr = float(self.optimizer.param_groups[0]["lr"])
        state = self.gather()
        role = self.schedule.role(self.iteration)
        step = self.method.step_of(role)
        meta_batch = (x_meta, y_meta) if self.method.meta_batch else None
        new, metrics = step(
            self.model, self.meta_net, state, (x, y), meta_batch, lr, hp, self.reduce
        )
        self.scatter(new)
        self.iteration += 1
        return {k: v.detach() for k, v in metrics.items()}

    def hyperparameters(self) -> StepHP:
        """The StepHP of the next step: the optimisers' current settings and this one's."""
        group = same_settings(self.optimizer, "optimizer")
        if self.kind == "sgd":
            opt = dict(momentum=group["momentum"], nesterov=group["nesterov"])
            betas, eps = META_BETAS, META_EPS  # not read
        else:
            opt = dict(momentum=0.0, nesterov=False)
            betas, eps = tuple(float(b) for b in group["betas"]), float(group["eps"])
        meta_lr, meta_wd = 1.0, 0.0
        if self.meta_optimizer is not None:
            meta = same_settings(self.meta_optimizer, "meta_optimizer")
            if meta.get("decoupled_weight_decay") and meta["weight_decay"]:
                raise SettingError(
                    "meta_optimizer decoupled_weight_decay=True: allowed: False (Adam's L2 decay)"
                )
            if tuple(meta["betas"]) != META_BETAS or meta["eps"] != META_EPS:
                raise SettingError(
                    f"meta_optimizer betas={tuple(meta['betas'])}, eps={meta['eps']}: allowed: "
                    f"betas={META_BETAS}, eps={META_EPS}"
                )
            meta_lr, meta_wd = float(meta["lr"]), float(meta["weight_decay"])
        return StepHP(
            optimizer=self.kind,
            weight_decay=float(group["weight_decay"]),
            adam_betas=betas,
            adam_eps=eps,
            meta_lr=meta_lr,
            meta_weight_decay=meta_wd,
            **opt,
            **self.settings,
        )

    # ------------------------------------------------------------ module and optimisers <-> state

    def gather(self) -> dict:
        """The functional state of the model, the optimisers and this reweighter."""
        params = {name: p.detach() for p, name in self.names.items()}
        held = {id(p) for p in self.names}
        buffers = {k: b for k, b in self.model.named_buffers()}
        # parameters the optimiser does not hold: constants of the step, passed with the buffers
        buffers.update(
            {k: p.detach() for k, p in self.model.named_parameters() if id(p) not in held}
        )
        state = {"params": params, "buffers": buffers, **self.constants}
        state["momentum"] = optimiser_state(self.optimizer, self.names, self.kind)
        if self.meta_net is not None:
            meta = {name: p.detach() for p, name in self.meta_names.items()}
            state["meta_params"] = meta
            state["meta_opt"] = optimiser_state(self.meta_optimizer, self.meta_names, "adam")
        if self.scaler is not None:
            state["scaler"] = self.scaler
        return state

    @torch.no_grad()
    def scatter(self, state: dict) -> None:
        """The new state written back in place into the model and the optimisers."""
        for p, name in self.names.items():
            p.copy_(state["params"][name])
        own = dict(self.model.named_buffers())
        for k, b in own.items():
            b.copy_(state["buffers"][k])
        put_optimiser_state(self.optimizer, self.names, self.kind, state["momentum"])
        if self.meta_net is not None:
            for p, name in self.meta_names.items():
                p.copy_(state["meta_params"][name])
            put_optimiser_state(self.meta_optimizer, self.meta_names, "adam", state["meta_opt"])
        if self.scaler is not None:
            self.scaler = state["scaler"]

    @torch.no_grad()
    def weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The meta-net's weight of each sample of (x, y) at the current parameters (mean 1
        over the batch with normalize_weights), without changing anything."""
        if self.meta_net is None:
            raise SettingError("weights: this method learns no meta-net")
        state = self.gather()
        losses, _ = per_sample_loss(self.model, state["params"], state["buffers"], x, y)
        return sample_weights(
            self.meta_net,
            state["meta_params"],
            losses,
            y,
            self.constants,
            self.settings["normalize_weights"],
            self.reduce,
        )


# ---------------------------------------------------------------- torch.optim's settings and state


def choose(setting: str, value, allowed: tuple) -> None:
    if value not in allowed:
        names = " | ".join("None" if a is None else str(a) for a in allowed)
        raise SettingError(f"{setting}={value!r}: allowed values are {names}")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """sgd | adam | adamw, or a one-line refusal naming what the exact step cannot follow."""
    kinds = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
    kind = kinds.get(type(optimizer))
    if kind == "adam" and optimizer.param_groups[0].get("decoupled_weight_decay"):
        kind = "adamw"
    if kind is None:
        raise SettingError(
            f"optimizer={type(optimizer).__name__}: allowed: torch.optim.SGD | Adam | AdamW "
            "(the step differentiates through the optimiser's own rule)"
        )
    group = optimizer.param_groups[0]
    refused = {"maximize": False, "dampening": 0, "amsgrad": False}
    for key, ok in refused.items():
        if key in group and group[key] != ok:
            raise SettingError(f"optimizer {key}={group[key]}: allowed: {ok}")
    return kind


SETTINGS = ("lr", "momentum", "nesterov", "weight_decay", "betas", "eps", "dampening", "maximize")
SETTINGS += ("amsgrad", "decoupled_weight_decay")


def same_settings(optimizer: torch.optim.Optimizer, which: str) -> dict:
    """The one setting of every param group (the step applies one to all parameters)."""
    groups = optimizer.param_groups
    first = groups[0]
    for i, group in enumerate(groups[1:], 1):
        for key in SETTINGS:
            if key in first and not same(group[key], first[key]):
                raise SettingError(
                    f"{which}.param_groups[{i}] has {key}={group[key]} where param_groups[0] has "
                    f"{first[key]}: the step applies one setting to every parameter"
                )
    return first


def same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # a tensor learning rate
        return float(a) == float(b)
    return a == b


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer, which: str) -> dict:
    """{parameter: its name in the module} for every parameter the optimiser holds."""
    names = {id(p): k for k, p in module.named_parameters()}
    held = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise SettingError(
                    f"{which} holds a parameter of shape {tuple(p.shape)} that "
                    "is not one of the module's"
                )
            held[p] = names[id(p)]
    if not held:
        raise SettingError(f"{which} holds no parameters")
    return held


def optimiser_state(optimizer: torch.optim.Optimizer, names: dict, kind: str) -> dict:
    """torch.optim's per-parameter state as the functional state (mwn.core.optim)."""
    state = optimizer.state
    params = list(names)
    if kind == "sgd":
        out = {}
        for p in params:
            buf = state.get(p, {}).get("momentum_buffer")
            out[names[p]] = torch.zeros_like(p) if buf is None else buf
        return out
    started = [p for p in params if "step" in state.get(p, {})]
    if not started:
        return adam_init({names[p]: p.detach() for p in params})
    steps = {float(state[p]["step"]) for p in started}
    if len(started) != len(params) or len(steps) > 1:
        raise SettingError(
            f"{type(optimizer).__name__}: its parameters are at different steps {sorted(steps)} "
            "(or some have none): the step advances all of them together"
        )
    p0 = params[0]
    return {
        "step": torch.tensor(steps.pop(), dtype=p0.dtype, device=p0.device),
        "exp_avg": {names[p]: state[p]["exp_avg"] for p in params},
        "exp_avg_sq": {names[p]: state[p]["exp_avg_sq"] for p in params},
    }


def put_optimiser_state(optimizer, names: dict, kind: str, new: dict) -> None:
    """The functional state written into torch.optim's per-parameter state, in its own keys."""
    state = optimizer.state
    if kind == "sgd":
        if optimizer.param_groups[0]["momentum"] == 0:
            return  # torch.optim.SGD keeps no buffer without momentum
        for p, name in names.items():
            buf = state[p].get("momentum_buffer")
            if buf is None:
                state[p]["momentum_buffer"] = new[name].clone()
            else:
                buf.copy_(new[name])
        return
    step = float(new["step"])
    for p, name in names.items():
        s = state[p]
        if "step" not in s:  # as torch.optim creates it
            s["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["step"].fill_(step)
        s["exp_avg"].copy_(new["exp_avg"][name])
        s["exp_avg_sq"].copy_(new["exp_avg_sq"][name])


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
