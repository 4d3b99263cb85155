"""Hydra's own command-line flags in every documented form, and the one-line refusals that come
before Hydra starts: each through the real command line."""

from __future__ import annotations

import re

import pytest

from conftest import FAST, ROOT, run_cli


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["-c", "job"], ["--cfg=job"]])
def test_cfg_job_prints_the_composed_config_in_every_form(tmp_path, flag):
    r = run_cli(*flag, "seed=7", "model.width=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "seed: 7" in r.stdout and "width: 4" in r.stdout and "hydra:" not in r.stdout
    assert not (tmp_path / "outputs").exists()  # printed, not run


def test_cfg_hydra_package_and_resolve(tmp_path):
    r = run_cli("--cfg", "job", "--package", "model", "--resolve", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "arch: resnet" in r.stdout and "seed:" not in r.stdout


@pytest.mark.parametrize("flag", [["--info", "plugins"], ["-i", "plugins"], ["--info=plugins"]])
def test_info_plugins_lists_the_vmap_launcher(tmp_path, flag):
    r = run_cli(*flag, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "VmapLauncher" in r.stdout


def test_bare_info_and_help(tmp_path):
    info = run_cli("--info", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "Config search path" in info.stdout
    r = run_cli("-h", cwd=tmp_path)  # --help: below
    assert r.returncode == 0 and r.stdout.startswith("mwn: train an image classifier"), r.stderr
    hydra_help = run_cli("--hydra-help", cwd=tmp_path)
    assert hydra_help.returncode == 0 and "Hydra (" in hydra_help.stdout


def test_shell_completion(tmp_path):
    r = run_cli("--shell-completion", "install=bash", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "complete -o nospace -o default -F hydra_bash_completion" in r.stdout
    short = run_cli("-sc", "install=bash", cwd=tmp_path)
    assert short.returncode == 0 and short.stdout == r.stdout


def test_a_bad_flag_value_is_one_line(tmp_path):
    r = run_cli("--cfg", "everything", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mwn: error: argument --cfg/-c: invalid choice: 'everything' (choose from job, hydra, all)"
    ] or r.stderr.strip().startswith("mwn: error: argument --cfg/-c: invalid choice")
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_flag_after_the_overrides_is_one_line_giving_the_order_hydra_takes(tmp_path):
    r = run_cli("seed=1", "-m", "train_iters=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "mwn: error: -m after the override seed=1: Hydra's flags come before the overrides "
        "(python -m mwn.train -m seed=1 train_iters=2 hydra.sweep.dir=sweep)"
    )
    assert not (tmp_path / "sweep").exists()
    from mwn.cli import parse_argv  # a flag with a value keeps it

    assert parse_argv(["seed=1", "--cfg", "job", "x=2"])[1] == (
        "--cfg after the override seed=1: Hydra's flags come before the overrides "
        "(python -m mwn.train --cfg job seed=1 x=2)"
    )


def test_an_unknown_launcher_is_refused_in_one_line_naming_the_allowed_ones(tmp_path):
    r = run_cli("-m", "hydra/launcher=nope", "seed=1", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "mwn: error: hydra/launcher=nope: allowed values are "
        "basic | vmap | joblib | submitit_local | submitit_slurm | slurm"
    )
    assert not (tmp_path / "multirun").exists()


def test_a_launcher_without_multirun_is_refused_in_one_line(tmp_path):
    r = run_cli("hydra/launcher=vmap", *FAST, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "mwn: error: hydra/launcher=vmap: a launcher runs the jobs of a sweep; add -m "
        "(python -m mwn.train -m ...), or leave it out for a single run"
    )
    assert not (tmp_path / "outputs").exists()


def test_multirun_long_form_and_a_user_config_folder(tmp_path):
    """--multirun as -m; a config group option from the user's own folder (--config-dir and
    hydra.searchpath), which the one-line checks accept and Hydra composes."""
    mine = tmp_path / "my_conf" / "model"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text("arch: resnet\ndepth: 8\nwidth: 3\n")
    sweep = tmp_path / "sweep"
    r = run_cli(
        "--multirun",
        "--config-dir",
        str(tmp_path / "my_conf"),
        "model=tiny",
        "seed=0,1",
        *[a for a in FAST if not a.startswith("model.")],
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert "width: 3" in (sweep / "0" / ".hydra" / "config.yaml").read_text()
    shown = run_cli(
        "--cfg",
        "job",
        f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
        "model=tiny",
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert "width: 3" in shown.stdout
    missing = run_cli("model=tiny", *FAST, cwd=tmp_path)  # without the folder: one line
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "mwn: error: model=tiny: allowed values are "
        "resnet18 | resnet32 | resnet50 | resnet8 | vit_tiny | wrn28_10"
    )


def test_the_config_comments_name_every_option_of_each_group():
    """conf/config.yaml's defaults list says, beside each group, every option it has."""
    lines = (ROOT / "conf" / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"  - (\w+): \w+ +#(.*)", line)
        if not found:
            continue
        group, comment = found.group(1), found.group(2)
        for more in lines[i + 1 :]:  # the comment's continuation lines
            if not re.match(r" {20,}#", more):
                break
            comment += more
        options = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
        missing = {o for o in options if not re.search(rf"\b{o}\b", comment)}
        assert not missing, f"conf/config.yaml: the {group} comment leaves out {missing}"


def test_help_says_what_mwn_is_and_lists_the_groups_and_experiments(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mwn: train an image classifier with Meta-Weight-Net")
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert f"experiment: {', '.join(experiments)}" in r.stdout
    assert "+experiment=NAME" in r.stdout and "docs/" in r.stdout


def test_an_experiment_without_plus_says_to_add_it(tmp_path):
    r = run_cli("experiment=long_tail_cifar10", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "mwn: error: experiment=long_tail_cifar10: an experiment is added to the defaults; "
        "write +experiment=long_tail_cifar10"
    )
    assert not (tmp_path / "outputs").exists()
