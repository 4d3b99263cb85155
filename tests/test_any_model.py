"""Any nn.Module from the command line (`model._target_`, the torchvision and timm presets) and
the classifier's optimiser as a setting (`optimizer=adamw`): built, adopted, refused in one line
when it does not fit the data, trained and resumed end to end."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mwn.config import ConfigError
from mwn.core.batchnorm import BatchNorm2d
from mwn.run.model import build_model, model_name

from conftest import assert_same_run, make_cfg, run_cli

USER_MODULE = '''
import torch
from torch import nn

class MyNet(nn.Module):
    """A user's own classifier: conv, torch BatchNorm, pool, linear."""
    def __init__(self, num_classes, width=4, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

def with_dropout(num_classes):
    layers = [nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, num_classes)]
    return nn.Sequential(*layers)

def two_outputs(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("user_nets", None)


def model_cfg(_target_: str, args: dict | None = None):
    """The `model` settings of a target (the command line adds args with +model.args.KEY=V)."""
    return OmegaConf.create(
        {"arch": None, "depth": None, "width": None, "_target_": _target_, "args": args or {}}
    )


def test_a_users_module_is_built_with_the_datas_classes_and_adopted(user_pkg):
    net = build_model(model_cfg(_target_="user_nets.MyNet", args={"width": 6}), 7, (1, 8, 8))
    assert net.fc.out_features == 7 and net.conv.out_channels == 6
    assert type(net.bn) is BatchNorm2d  # the step's rules, same parameters
    assert model_name(model_cfg(_target_="user_nets.MyNet")) == "MyNet"


@pytest.mark.parametrize(
    "target,args,message",
    [
        ("user_nets.Nope", {}, "model._target_=user_nets.Nope: cannot be imported"),
        ("user_nets.MyNet", {"num_classes": 3}, "model.args.num_classes=3: the data has 7"),
        ("user_nets.MyNet", {"bogus": 1}, "calling it with"),
        ("user_nets.with_dropout", {}, "layer 2 (Dropout, p=0.5) draws random numbers"),
        ("user_nets.two_outputs", {}, "gives (2, 2) for 2 images; the step needs logits (2, 7)"),
        ("user_nets.MyNet", {"in_channels": 3}, "fails on the data's 1x8x8 images"),
    ],
)
def test_a_module_that_does_not_fit_is_refused_in_one_line(user_pkg, target, args, message):
    with pytest.raises(ConfigError) as info:
        build_model(model_cfg(_target_=target, args=args), 7, (1, 8, 8))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("preset", ["resnet8", "resnet32", "wrn28_10", "resnet18", "resnet50"])
def test_a_preset_is_named_by_its_option_in_the_log_and_summary(preset):
    assert model_name(make_cfg(f"model={preset}").model) == preset


def test_the_torchvision_presets_build_for_rgb_data():
    for preset, params in (("resnet18", 11_181_642), ("resnet50", 23_528_522)):
        cfg = make_cfg(f"model={preset}")
        net = build_model(cfg.model, 10, (3, 32, 32))
        assert sum(p.numel() for p in net.parameters()) == params
        assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
        assert model_name(cfg.model) == preset


def test_the_timm_vit_preset_takes_an_exact_meta_gradient_step():
    """A ViT's attention runs scaled_dot_product_attention, whose fused CPU kernel has no
    forward-mode derivative: the JVP pass takes the composite kernel."""
    pytest.importorskip("timm")
    import mwn

    cfg = make_cfg("model=vit_tiny")
    assert model_name(cfg.model) == "vit_tiny_patch16_224"
    args = {**OmegaConf.to_container(cfg.model.args), "embed_dim": 16, "depth": 2, "num_heads": 2}
    net = build_model(model_cfg(_target_=cfg.model._target_, args=args), 5, (3, 32, 32))
    rw = mwn.MetaReweighter(net, torch.optim.AdamW(net.parameters(), lr=1e-3))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    metrics = rw.step(x, y, x, y)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_a_users_module_and_adamw_train_and_resume_from_the_command_line(user_pkg, tmp_path):
    """`python -m mwn.train model._target_=... optimizer=adamw`: trained, its name in the
    summary, Adam's moments in the checkpoint, and a run stopped at 4 iterations and continued
    to 6 the same, bit for bit, as one run of 6."""
    common = [
        "model._target_=user_nets.MyNet",
        "+model.args.width=3",
        "optimizer=adamw",
        "lr=1e-3",
        "weight_decay=0.05",
        "train_iters=6",
        "val_every=2",  # iteration 4, the first run's end, is a validation in both
        "log_every=2",
        "checkpoint_every=2",
        "progress=none",
    ]
    # (the module sits in the launch directory, which `python -m` puts on the path)
    whole = run_cli(*common, "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    part = run_cli(*common, "train_iters=4", "hydra.run.dir=part", cwd=tmp_path)
    assert part.returncode == 0, part.stderr[-2000:]
    rest = run_cli(*common, "hydra.run.dir=part", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert_same_run(tmp_path / "whole", tmp_path / "part")
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["model"] == "MyNet"
    state = torch.load(
        sorted((tmp_path / "whole").glob("checkpoint-*.pt"))[-1], weights_only=False
    )["state"]
    assert set(state["momentum"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert int(state["momentum"]["step"]) == 6
    assert state["params"]["conv.weight"].shape[0] == 3
