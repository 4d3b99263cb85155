"""Your own long-tailed, noisy image folder as it is: its own class counts, a trusted meta/ folder,
a validation split on which "best" is chosen, class names in every output, the long-tail scores,
the trained model applied to new images (mwn.predict, mwn.load_model) and the meta-net's verdict
on every training image (mwn.weights)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mwn import predict as predict_cli
from mwn import weights as weights_cli
from mwn.data.build import build_data
from mwn.data.images import DataError
from mwn.run.evaluate import class_scores, predict
from mwn.run.files import result_line
from mwn.run.launch import train
from mwn.run.trained import load_model, load_trained, rebuild

from conftest import make_cfg

CLASSES = ("daisy", "rose", "tulip")
TINY = [
    "model=resnet8",
    "model.width=4",
    "batch_size=6",
    "meta_batch_size=3",
    "lr_milestones=[100]",
    "device=cpu",
    "dataset.crop_padding=0",
    "dataset.flip=false",
]


def write_folder(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> None:
    """root/<split>/<class>/<n>.png, 8x8 grey images whose brightness tells the class (plus
    noise, so that every image is distinct): counts[split][class] images."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            for i in range(per_class.get(name, 0)):
                folder.mkdir(parents=True, exist_ok=True)
                pixels = 40 + 80 * c + rng.integers(0, 30, (8, 8))
                Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")


def cfg_for(root: Path, *overrides: str):
    return make_cfg("dataset=image_folder", f"dataset.root={root}", *TINY, *overrides)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pixels_of(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in x}


LONG_TAILED = {"train": {"daisy": 30, "rose": 6, "tulip": 3}, "test": dict.fromkeys(CLASSES, 4)}


def test_a_long_tailed_folder_trains_as_it_is_and_names_its_classes(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, LONG_TAILED)
    out = tmp_path / "run"
    cfg = cfg_for(root, "meta_per_class=2", "train_iters=4", "val_every=2")
    assert cfg.imbalance is None  # the image folders' default: the data's own counts
    summary = train(cfg, out)
    assert summary["train_class_counts"] == [28, 4, 1]  # each class less its 2 meta images
    assert summary["imbalance"] is None and summary["imbalance_ratio"] == 28.0
    assert summary["classes"] == list(CLASSES)
    assert summary["best_on"] == "test"
    line = result_line(summary)
    assert line.startswith("mwn resnet8 on flowers, the data's own counts (IF 28): final test acc ")
    assert ", highest test acc (iter " in line and " | final balanced acc " in line
    per_class = rows(out / "per_class.csv")
    assert [r["name"] for r in per_class] == list(CLASSES)
    assert [int(r["train_images"]) for r in per_class] == [28, 4, 1]
    assert [int(r["test_images"]) for r in per_class] == [4, 4, 4]
    with open(out / "confusion.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == list(CLASSES) and [r[0] for r in table[1:]] == list(CLASSES)
    confusion = np.array([[int(v) for v in r[1:]] for r in table[1:]])
    assert confusion.sum(1).tolist() == [4, 4, 4]
    recall = np.diag(confusion) / confusion.sum(1)
    assert summary["final_test_balanced_acc"] == pytest.approx(100 * recall.mean())
    record = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["test_balanced_acc"] == summary["final_test_balanced_acc"]
    assert "confusion" not in record  # C x C numbers stay out of metrics.jsonl


def test_a_class_too_small_for_the_meta_set_is_one_line_naming_it(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, LONG_TAILED)
    with pytest.raises(DataError, match=r"^meta_per_class=3: class 'tulip' has only 3 training"):
        build_data(cfg_for(root, "meta_per_class=3"), torch.device("cpu"))
    with pytest.raises(
        DataError, match=r"class 'tulip' has only 3 training images and 3 must stay"
    ):
        build_data(cfg_for(root, "meta_per_class=1", "val_per_class=2"), torch.device("cpu"))


def test_a_meta_folder_is_the_whole_meta_set_and_never_trained_on(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, {**LONG_TAILED, "meta": dict.fromkeys(CLASSES, 2)}, seed=1)
    data = build_data(cfg_for(root, "meta_per_class=5"), torch.device("cpu"))  # not read
    assert data.counts == [30, 6, 3]  # the whole training folder
    assert len(data.meta) == 6 and torch.bincount(data.meta.y).tolist() == [2, 2, 2]
    meta_files = sorted((root / "meta").glob("*/*.png"))
    on_disk = {np.asarray(Image.open(p)).tobytes() for p in meta_files}
    assert pixels_of(data.meta.x) == on_disk
    assert not pixels_of(data.meta.x) & pixels_of(data.train.x)
    assert data.train_files == sorted(
        p.relative_to(root).as_posix() for p in root.glob("train/*/*")
    )


def test_validation_meta_and_training_sets_are_disjoint_and_seeded(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, LONG_TAILED)
    cfg = cfg_for(root, "meta_per_class=1", "val_per_class=1")
    data = build_data(cfg, torch.device("cpu"))
    assert torch.bincount(data.val.y).tolist() == [1, 1, 1]
    assert torch.bincount(data.meta.y).tolist() == [1, 1, 1]
    assert data.counts == [28, 4, 1]
    val, meta, trained = pixels_of(data.val.x), pixels_of(data.meta.x), pixels_of(data.train.x)
    # 39 distinct images in the folder: each in exactly one set
    assert len(val) + len(meta) + len(trained) == len(val | meta | trained) == 39
    assert torch.equal(build_data(cfg, torch.device("cpu")).val.x, data.val.x)  # seeded
    other = build_data(cfg_for(root, "meta_per_class=1", "val_per_class=1", "seed=1"), "cpu")
    assert pixels_of(other.val.x) != val  # another seed, another draw


def test_a_val_folder_is_the_validation_set_and_val_per_class_is_then_refused(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, {**LONG_TAILED, "val": dict.fromkeys(CLASSES, 2)}, seed=2)
    data = build_data(cfg_for(root, "meta_per_class=1"), torch.device("cpu"))
    assert len(data.val) == 6 and data.counts == [29, 5, 2]
    with pytest.raises(DataError, match=r"^val_per_class=1: the dataset has its own val/ folder"):
        build_data(cfg_for(root, "meta_per_class=1", "val_per_class=1"), torch.device("cpu"))


def test_a_meta_class_missing_from_train_is_one_line_naming_it(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, LONG_TAILED)
    (root / "meta" / "lily").mkdir(parents=True)
    Image.new("L", (8, 8)).save(root / "meta" / "lily" / "0.png")
    with pytest.raises(DataError, match=r"meta/lily: meta class 'lily' has no folder in .*train$"):
        build_data(cfg_for(root), torch.device("cpu"))


def test_best_is_chosen_on_validation_and_reports_test_accuracy_there(tmp_path):
    """A val/ folder whose labels are shifted by one class: its accuracy is highest where the
    test accuracy is not, so the two choices of "best" fall on different iterations."""
    root = tmp_path / "flowers"
    counts = {"train": dict.fromkeys(CLASSES, 20), "test": dict.fromkeys(CLASSES, 6)}
    write_folder(root, counts)
    write_folder(tmp_path / "shifted", {"test": dict.fromkeys(CLASSES, 6)}, seed=3)
    for c, name in enumerate(CLASSES):  # class c's images filed under class c + 1
        src = tmp_path / "shifted" / "test" / name
        dst = root / "val" / CLASSES[(c + 1) % 3]
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
    out = tmp_path / "run"
    summary = train(cfg_for(root, "meta_per_class=2", "train_iters=40", "val_every=2"), out)
    evals = [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "val_acc" in r
    ]
    by_val = max(evals, key=lambda r: r["val_acc"])  # the first of the maxima
    by_test = max(evals, key=lambda r: r["test_acc"])
    assert summary["best_on"] == "val"
    assert summary["best_iter"] == by_val["iter"] != by_test["iter"]
    assert summary["best_test_acc"] == by_val["test_acc"] < by_test["test_acc"]
    assert summary["best_val_acc"] == by_val["val_acc"]
    assert f"test acc at the best val acc (iter {by_val['iter']})" in result_line(summary)


def test_balanced_accuracy_and_macro_f1_match_hand_computed_values():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 3, 2, 2, 0, 2])  # class 3: predicted, never true
    s = class_scores(pred, target, 4)
    # recall: 2/3, 1/2, 3/4 (class 3 has no samples: left out of the balanced accuracy)
    assert s["test_balanced_acc"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 3 / 4) / 3)
    # F1 = 2pr / (p + r): class 0 p 2/3 r 2/3; class 1 p 1/2 r 1/2; class 2 p 1 r 3/4; class 3 0
    f1 = [2 / 3, 1 / 2, 2 * 0.75 / 1.75, 0.0]
    assert s["f1"] == pytest.approx(f1)
    assert s["test_macro_f1"] == pytest.approx(100 * sum(f1) / 4)  # scikit-learn's labels
    assert s["precision"] == pytest.approx([2 / 3, 1 / 2, 1.0, 0.0])
    assert s["confusion"] == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 3, 0], [0, 0, 0, 0]]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short run on a folder whose meta-net has something to weigh (label noise)."""
    tmp = tmp_path_factory.mktemp("own")
    root = tmp / "flowers"
    write_folder(root, LONG_TAILED)
    out = tmp / "run"
    cfg = cfg_for(root, "meta_per_class=2", "train_iters=6", "val_every=3", "noise=uniform",
                  "noise_rate=0.5")  # fmt: skip
    train(cfg, out)
    return root, out


def test_predict_on_training_images_gives_what_the_evaluation_gives(trained_run, tmp_path):
    root, out = trained_run
    csv_path = tmp_path / "pred.csv"
    assert predict_cli.main([str(out), str(root / "train"), "-o", str(csv_path), "--probs"]) == 0
    got = {Path(r["file"]).relative_to(root).as_posix(): r for r in rows(csv_path)}
    run = rebuild(out)
    logits = predict(run.model, run.state["params"], run.state["buffers"], run.data.train)
    probs = logits.softmax(1)
    assert len(got) == 39  # the whole folder: training and meta images
    for i, source in enumerate(run.data.train_index.tolist()):
        row = got[run.data.train_files[source]]
        c = int(probs[i].argmax())
        assert row["predicted"] == CLASSES[c] and int(row["class"]) == c
        assert float(row["probability"]) == pytest.approx(probs[i, c].item(), abs=1e-6)
        assert [float(row[name]) for name in CLASSES] == pytest.approx(probs[i].tolist(), abs=1e-6)
    model = load_model(out)
    assert not model.training
    trained = load_trained(out)
    assert trained.classes == list(CLASSES) and trained.preprocess.shape == (1, 8, 8)


def test_predict_refuses_what_it_cannot_read_in_one_line(trained_run, tmp_path, capsys):
    root, out = trained_run
    assert predict_cli.main([str(out), str(tmp_path / "none.png")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.png: no such file or folder")
    big = tmp_path / "big.png"
    Image.new("L", (16, 8)).save(big)
    assert predict_cli.main([str(out), str(big)]) == 2
    assert "big.png is 16x8, the run's images are 8x8" in capsys.readouterr().err
    assert predict_cli.main([str(tmp_path), str(big)]) == 2
    assert "no checkpoint-*.pt in it" in capsys.readouterr().err


def test_weights_lists_every_training_image_least_trusted_first(trained_run, tmp_path):
    root, out = trained_run
    path = tmp_path / "w.csv"
    assert weights_cli.main([str(out), "-o", str(path)]) == 0
    table = rows(path)
    assert len(table) == 33 and [int(r["rank"]) for r in table] == list(range(1, 34))
    weights = [float(r["weight"]) for r in table]
    assert weights == sorted(weights)
    run = rebuild(out)
    noise = json.loads((out / "noise.json").read_text())
    assert sum(int(r["corrupted"]) for r in table) == noise["corrupted"]
    files = {r["file"] for r in table}
    trained_files = {run.data.train_files[i] for i in run.data.train_index.tolist()}
    assert files == trained_files and len(files) == 33  # every training image once, by file
    for r in table:
        assert r["label_name"] == CLASSES[int(r["label"])]
        assert r["predicted_name"] == CLASSES[int(r["predicted"])]
    # the weights are the meta-net's at the final state, for the listed losses
    from mwn.core.step import run_constants, sample_weights

    loss = torch.tensor([float(r["loss"]) for r in table])
    labels = torch.tensor([int(r["label"]) for r in table])
    w = sample_weights(run.meta_net, run.state["meta_params"], loss, labels,
                       run_constants(run.state), False)  # fmt: skip
    assert w.tolist() == pytest.approx(weights, rel=1e-4)


def test_weights_by_loss_and_the_note_on_a_weight_that_rises_with_the_loss(
    trained_run, tmp_path, capsys
):
    root, out = trained_run
    assert weights_cli.main([str(out), "-o", str(tmp_path / "w.csv"), "--by", "loss"]) == 0
    by_loss = rows(tmp_path / "w.csv")
    losses = [float(r["loss"]) for r in by_loss]
    assert losses == sorted(losses, reverse=True) and all(r["weight"] for r in by_loss)
    assert "by loss, highest first:" in capsys.readouterr().out
    # the note: Spearman's rank correlation, against hand counts
    rank_correlation, t = weights_cli.rank_correlation, torch.tensor
    assert rank_correlation(t([1.0, 2, 3]), t([3.0, 5, 9])) == pytest.approx(1)
    assert rank_correlation(t([1.0, 2, 3]), t([9.0, 5, 3])) == pytest.approx(-1)
    # ranks (1, 2.5, 2.5) and (1, 2, 3): covariance 1.5 / sqrt(1.5 * 2)
    rho = rank_correlation(t([1.0, 2, 2]), t([1.0, 2, 3]))
    assert rho == pytest.approx(1.5 / (1.5 * 2) ** 0.5)
    rising = [{"loss": 0.5, "weight": 0.1}, {"loss": 2, "weight": 0.7}, {"loss": 1, "weight": 0.2}]
    falling = [{**r, "weight": 1 - r["weight"]} for r in rising]
    assert "weight rises with the loss (Spearman 1.00" in weights_cli.trend_note(rising)
    assert weights_cli.trend_note(falling) is None


def test_weights_of_a_run_without_a_meta_net_rank_by_loss(tmp_path):
    root = tmp_path / "flowers"
    write_folder(root, LONG_TAILED)
    out = tmp_path / "run"
    train(cfg_for(root, "meta_per_class=2", "train_iters=2", "val_every=2", "method=erm"), out)
    assert weights_cli.main([str(out)]) == 0
    table = rows(out / "weights.csv")
    losses = [float(r["loss"]) for r in table]
    assert losses == sorted(losses, reverse=True) and all(r["weight"] == "" for r in table)


def test_a_streamed_run_is_the_in_memory_run(tmp_path, caplog):
    """dataset.load=stream: the same batches (images, crops, flips) decoded by DataLoader
    workers, so the same losses; each run says which path it takes and why."""
    root = tmp_path / "flowers"
    write_folder(root, LONG_TAILED)
    runs = {}
    for load in ("memory", "stream", "auto"):
        caplog.clear()
        with caplog.at_level("INFO", logger="mwn"):
            out = tmp_path / load
            args = ["meta_per_class=2", "train_iters=6", "val_every=3", "log_every=1"]
            args += ["dataset.crop_padding=2", "dataset.flip=true", f"dataset.load={load}"]
            train(cfg_for(root, *args, "dataset.workers=1"), out)
        runs[load] = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data ")]
        expected = {
            "memory": "data in memory (dataset.load=memory)",
            "stream": "data streamed from disk, decoded by dataset.workers=1 (dataset.load=stream)",
            "auto": "data in memory: decoded it takes 3.26e-06 GB, within "
            "dataset.memory_budget_gb=8 (dataset.load=auto)",
        }[load]
        assert said == [expected]
    for a, b in zip(runs["memory"], runs["stream"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a.get("test_acc") == b.get("test_acc")
    assert len(runs["memory"]) == len(runs["stream"]) == 6
    assert runs["auto"] == runs["memory"]  # a small folder stays in memory
