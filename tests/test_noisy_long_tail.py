"""examples/noisy_long_tail.py: long-tailed counts, clean and disjoint meta/val/train splits,
labels.csv that matches the files, seeded noise, and one-line refusals; on tiny PNG folders."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "noisy_long_tail.py"
CLASSES = ["cat", "dog", "owl", "yak"]


def make_source(root: Path, classes: list[str], train: int, test: int) -> Path:
    """root/train/<class>/NNNN.png and root/test/<class>/NNNN.png, every image different."""
    rng = np.random.default_rng(123)
    for split_id, (split, count) in enumerate((("train", train), ("test", test))):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                pixels[0, 0] = (split_id, c, i % 256)
                pixels[0, 1] = (i // 256, 0, 0)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def run(src: Path, dst: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), str(src), str(dst), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def files(root: Path) -> dict[str, bytes]:
    """Every file under root, by posix path relative to root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def labels(dst: Path) -> list[dict[str, str]]:
    with open(dst / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["file", "true_label", "given_label", "corrupted"]
        return list(reader)


def expected_counts(n_max: int, imbalance: float, classes: int) -> list[int]:
    return [int(n_max * imbalance ** (-c / (classes - 1))) for c in range(classes)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src"), CLASSES, train=40, test=5)


def test_long_tailed_clean_disjoint_splits_and_labels_csv_match_the_files(source, tmp_path):
    dst = tmp_path / "out"
    args = ["--imbalance", "4", "--max-per-class", "20", "--noise", "0.5"]
    args += ["--meta-per-class", "3", "--val-per-class", "2", "--test-per-class", "3"]
    proc = run(source, dst, *args, "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    src_files = files(source)
    origin = {content: path.split("/") for path, content in src_files.items()}
    assert len(origin) == len(src_files)  # every source image is different
    out = files(dst)
    assert sorted({p.split("/")[0] for p in out}) == ["labels.csv", "meta", "test", "train", "val"]

    used: list[tuple[str, str]] = []  # (class, name) of each source training image taken
    for split, per_class in (("meta", 3), ("val", 2)):
        for name in CLASSES:
            taken = [p for p in out if p.startswith(f"{split}/{name}/")]
            assert len(taken) == per_class
            for path in taken:  # byte-identical copy of an image of its own class
                assert origin[out[path]] == ["train", name, path.split("/")[-1]]
                used.append((name, path.split("/")[-1]))

    rows = labels(dst)
    train_paths = sorted(p.removeprefix("train/") for p in out if p.startswith("train/"))
    assert sorted(row["file"] for row in rows) == train_paths  # each file listed exactly once
    for row in rows:
        folder, file_name = row["file"].split("/")
        assert row["given_label"] == folder
        assert row["corrupted"] == str(int(row["true_label"] != row["given_label"]))
        split, true_class, source_name = origin[out[f"train/{row['file']}"]]
        assert (split, true_class) == ("train", row["true_label"])
        assert file_name == f"{true_class}_{source_name}"
        used.append((true_class, source_name))
    assert len(used) == len(set(used))  # meta, val and train never share an image

    true_counts = Counter(row["true_label"] for row in rows)
    assert [true_counts[c] for c in CLASSES] == expected_counts(20, 4.0, 4) == [20, 12, 7, 5]
    given_counts = Counter(row["given_label"] for row in rows)
    for name in CLASSES:  # the train folders hold the given labels
        assert given_counts[name] == sum(p.startswith(f"train/{name}/") for p in out)

    for name in CLASSES:  # the first 3 test images of each class, by sorted name
        taken = sorted(p for p in out if p.startswith(f"test/{name}/"))
        assert taken == [f"test/{name}/{i:04d}.png" for i in range(3)]
        assert all(out[p] == src_files[p] for p in taken)

    corrupted = sum(row["corrupted"] == "1" for row in rows)
    assert 0 < corrupted < len(rows)
    assert f"Corrupted labels: {corrupted} of {len(rows)}" in proc.stdout


def test_corrupted_fraction_is_close_to_noise_times_c_minus_1_over_c(tmp_path):
    src = make_source(tmp_path / "src", CLASSES, train=310, test=1)
    dst = tmp_path / "out"
    proc = run(src, dst, "--imbalance", "1", "--max-per-class", "300", "--noise", "0.4")
    assert proc.returncode == 0, proc.stderr
    rows = labels(dst)
    assert len(rows) == 1200 and Counter(r["true_label"] for r in rows) == dict.fromkeys(
        CLASSES, 300
    )
    fraction = np.mean([r["corrupted"] == "1" for r in rows])
    assert abs(fraction - 0.4 * 3 / 4) < 0.06  # standard error ~0.013
    assert len(list((dst / "test").rglob("*.png"))) == 4  # all test images by default

    clean = run(
        src, tmp_path / "clean", "--imbalance", "1", "--max-per-class", "50", "--noise", "0"
    )
    assert clean.returncode == 0, clean.stderr
    assert all(r["corrupted"] == "0" for r in labels(tmp_path / "clean"))


def test_same_seed_same_result_other_seed_different(source, tmp_path):
    args = ["--imbalance", "4", "--max-per-class", "20", "--noise", "0.5", "--val-per-class", "2"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        proc = run(source, tmp_path / name, *args, "--seed", seed)
        assert proc.returncode == 0, proc.stderr
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c
    assert labels(tmp_path / "a") != labels(tmp_path / "c")


def test_existing_destination_is_refused_with_one_line(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    proc = run(source, dst, "--max-per-class", "10")
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert files(dst) == {"mine.txt": b"keep"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--imbalance", "2", "--max-per-class", "35", "--meta-per-class", "10"], "fewer than"),
        (["--noise", "1.5"], "--noise"),
        (["--imbalance", "0.5"], "--imbalance"),
        (["--imbalance", "100", "--max-per-class", "10"], "no training images"),
    ],
)
def test_bad_arguments_give_a_one_line_error_and_no_output(source, tmp_path, args, message):
    dst = tmp_path / "out"
    proc = run(source, dst, *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("noisy_long_tail.py: error:")
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written folder left behind
