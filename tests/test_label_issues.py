"""examples/label_issues.py: precision at K and AUC of a doubt ranking, against hand counts."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parent.parent / "examples" / "label_issues.py"
spec = importlib.util.spec_from_file_location("label_issues", PATH)
label_issues = importlib.util.module_from_spec(spec)
spec.loader.exec_module(label_issues)


def test_auc_and_precision_at_k_match_hand_counts():
    corrupted = np.array([True, False, True, False, False])
    assert label_issues.auc(np.array([5.0, 1, 4, 2, 3]), corrupted) == 1.0
    assert label_issues.auc(np.array([1.0, 5, 2, 4, 3]), corrupted) == 0.0
    assert label_issues.auc(np.zeros(5), corrupted) == 0.5  # all tied: chance
    # doubt order 0, 3, 2, 4, 1: pairs (corrupted, clean) won: image 0 beats 3 clean, image 2
    # beats 2 of 3 (not 3): 5 of 6
    doubt = np.array([5.0, 1, 3, 4, 2])
    assert label_issues.auc(doubt, corrupted) == pytest.approx(5 / 6)
    s = label_issues.scores(doubt, corrupted)
    assert s["precision_at_k"] == 0.5  # K = 2: images 0 and 3, one corrupted


def test_weights_csv_ranks_become_doubt_in_the_labels_order(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("rank,file\n1,train/b/x.png\n2,train/a/y.png\n")
    doubt = label_issues.from_weights(path, ["a/y.png", "b/x.png"])
    assert doubt.tolist() == [-2.0, -1.0]  # x.png, rank 1, is doubted most
    with pytest.raises(SystemExit, match="no row for c/z.png"):
        label_issues.from_weights(path, ["c/z.png"])
