"""mwn.image_folder on tiny PNG/JPEG folders written here with PIL: pixels, labels, channels,
resizing, the cache and its invalidation, the one-line errors, and channel_stats."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mwn.data import image_folder, images
from mwn.data.image_folder import load_image_folder
from mwn.data.images import DataError, channel_stats

from conftest import run_cli


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> np.ndarray:
    """Save uint8 pixels (H, W) or (H, W, C) as the image type of path's suffix; returns them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels)
    if mode is not None:
        img = img.convert(mode)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img.save(path, format=fmt)
    return pixels


def random_pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.transpose(2, 0, 1).copy()) if a.ndim == 3 else torch.from_numpy(a)


def make_rgb_folder(root: Path, counts: dict[str, tuple[int, int]], shape=(4, 5)) -> dict:
    """root/{train,test}/<class>/<i>.png of random RGB pixels (H, W = shape), counts[class] =
    (train, test). Returns {(split, class): [pixels in file order]}."""
    written = {}
    seed = 0
    for name, per_split in counts.items():
        for split, n in zip(("train", "test"), per_split):
            written[split, name] = []
            for i in range(n):
                seed += 1
                px = random_pixels(seed, (*shape, 3))
                written[split, name].append(write_image(root / split / name / f"{i}.png", px))
    return written


@pytest.fixture
def no_user_cache(tmp_path, monkeypatch):
    """Keep the user cache fallback inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def no_decode(monkeypatch):
    """After this, any decode fails the test: the data must come from the cache."""

    def refuse():
        def decode(path, image_size):
            raise AssertionError(f"decoded {path}: the cache was not used")

        monkeypatch.setattr(image_folder, "_decode", decode)

    return refuse


def cache_files(root: Path) -> list[Path]:
    return sorted((root / ".mwn-cache").glob("*.pt"))


def test_png_pixels_labels_and_class_order_round_trip(tmp_path, no_user_cache):
    root = tmp_path / "pets"
    # class names out of order on disk; index = position in the sorted train list
    written = make_rgb_folder(root, {"zebra": (2, 1), "cat": (3, 1), "dog": (1, 2)})
    for junk in ("train/cat/.DS_Store", "train/.hidden/x.png", "test/dog/._0.png"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"not an image, and ignored")
    ds = load_image_folder(root, progress=False)
    assert ds.name == "pets" and ds.num_classes == 3
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape == (6, 3, 4, 5) and ds.test_x.shape == (4, 3, 4, 5)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 2, 2]  # cat, dog, zebra
    assert ds.test_y.tolist() == [0, 1, 1, 2]
    for split in ("train", "test"):  # exact: PNG is lossless; (H, W, C) -> (C, H, W)
        want = [chw(a) for name in ("cat", "dog", "zebra") for a in written[split, name]]
        assert torch.equal(getattr(ds, f"{split}_x"), torch.stack(want))


def test_jpeg_any_case_suffix_and_subfolders_are_read(tmp_path, no_user_cache):
    root = tmp_path / "mixed"
    paths = [root / "train/a/x.JPG", root / "train/a/sub/y.jpeg", root / "train/b/z.PNG"]
    for i, p in enumerate(paths):
        write_image(p, random_pixels(i, (8, 8, 3)))
    write_image(root / "test/a/t.Jpeg", random_pixels(9, (8, 8, 3)))
    ds = load_image_folder(root, progress=False)
    assert ds.train_y.tolist() == [0, 0, 1]
    # lossy JPEG: the loader must give exactly what PIL decodes (sorted paths: sub/y before x)
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in (paths[1], paths[0], paths[2])]
    assert torch.equal(ds.train_x, torch.stack([chw(a) for a in decoded]))


def test_greyscale_keeps_one_channel_until_any_image_is_colour(tmp_path, no_user_cache):
    root = tmp_path / "grey"
    g = [random_pixels(i, (3, 4)) for i in range(4)]
    write_image(root / "train/a/0.png", g[0])
    write_image(root / "train/b/0.png", g[1])
    write_image(root / "train/b/1.jpg", g[2])  # greyscale JPEG
    write_image(root / "test/a/0.png", g[3])
    ds = load_image_folder(root, progress=False)
    assert ds.train_x.shape == (3, 1, 3, 4) and ds.test_x.shape == (1, 1, 3, 4)
    assert torch.equal(ds.train_x[1, 0], torch.from_numpy(g[1]))
    assert torch.equal(ds.test_x[0, 0], torch.from_numpy(g[3]))

    # one colour image in test (RGBA: alpha dropped) makes both splits RGB
    rgba = random_pixels(7, (3, 4, 4))
    write_image(root / "test/b/0.png", rgba)
    ds = load_image_folder(root, progress=False)
    assert ds.train_x.shape == (3, 3, 3, 4) and ds.test_x.shape == (2, 3, 3, 4)
    assert torch.equal(ds.train_x[0], torch.from_numpy(g[0]).expand(3, 3, 4))  # grey replicated
    assert torch.equal(ds.test_x[1], chw(rgba[..., :3]))

    # colour first, grey later in the same split; and grey first, colour later
    write_image(root / "train/a/1.png", random_pixels(8, (3, 4, 3)))
    ds = load_image_folder(root, progress=False)
    assert ds.train_x.shape == (4, 3, 3, 4)
    assert torch.equal(ds.train_x[0], torch.from_numpy(g[0]).expand(3, 3, 4))
    assert torch.equal(ds.train_x[2], torch.from_numpy(g[1]).expand(3, 3, 4))


def test_image_size_resizes_with_pil_bilinear_and_mixed_sizes_need_it(tmp_path, no_user_cache):
    root = tmp_path / "sizes"
    a = write_image(root / "train/a/0.png", random_pixels(1, (10, 12, 3)))
    write_image(root / "train/a/1.png", random_pixels(2, (7, 5, 3)))
    write_image(root / "test/a/0.png", random_pixels(3, (10, 12, 3)))
    with pytest.raises(DataError) as err:
        load_image_folder(root, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        f"{root / 'train/a/0.png'} is 12x10 but {root / 'train/a/1.png'} is 5x7: images differ "
        "in size; set dataset.image_size=N to resize every image to N x N"
    )
    ds = load_image_folder(root, image_size=6, progress=False)
    assert ds.train_x.shape == (2, 3, 6, 6) and ds.test_x.shape == (1, 3, 6, 6)
    want = np.asarray(Image.fromarray(a).resize((6, 6), Image.Resampling.BILINEAR))
    assert torch.equal(ds.train_x[0], chw(want))


def test_second_load_comes_from_the_cache_until_a_file_changes(tmp_path, no_user_cache, no_decode):
    root = tmp_path / "cached"
    make_rgb_folder(root, {"a": (2, 1), "b": (2, 1)})
    first = load_image_folder(root, progress=False)
    assert len(cache_files(root)) == 1
    no_decode()
    again = load_image_folder(root, progress=False)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert (again.name, again.num_classes) == (first.name, first.num_classes)

    # a file rewritten in place with the same size (only its mtime tells) is a new key
    changed = root / "train/b/1.png"
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match=r"decoded .*: the cache was not used"):
        load_image_folder(root, progress=False)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert torch.equal(load_image_folder(root, progress=False).train_x, first.train_x)
    with pytest.raises(AssertionError, match="the cache was not used"):  # another image_size
        load_image_folder(root, image_size=5, progress=False)


def test_changed_folder_gives_new_pixels_and_replaces_the_old_cache(tmp_path, no_user_cache):
    root = tmp_path / "changing"
    make_rgb_folder(root, {"a": (2, 1), "b": (1, 1)})
    load_image_folder(root, progress=False)
    old = cache_files(root)
    write_image(root / "train/b/1.png", np.full((4, 5, 3), 7, dtype=np.uint8))  # added
    ds = load_image_folder(root, progress=False)
    assert ds.train_y.tolist() == [0, 0, 1, 1] and int(ds.train_x[3].max()) == 7
    new = cache_files(root)
    assert len(new) == 1 and new != old  # the stale cache of the same image_size is removed
    load_image_folder(root, image_size=3, progress=False)
    assert len(cache_files(root)) == 2  # another image_size is another cache, kept


def test_corrupt_cache_is_ignored_with_a_warning_and_rebuilt(
    tmp_path, no_user_cache, no_decode, caplog
):
    root = tmp_path / "corrupt"
    make_rgb_folder(root, {"a": (1, 1)})
    first = load_image_folder(root, progress=False)
    (cache,) = cache_files(root)
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="mwn.data.image_folder"):
        ds = load_image_folder(root, progress=False)
    assert f"{cache}: unreadable cache ignored, rebuilding" in caplog.text
    assert torch.equal(ds.train_x, first.train_x)
    no_decode()
    assert torch.equal(load_image_folder(root, progress=False).train_x, first.train_x)
    assert not list((root / ".mwn-cache").glob(".*tmp"))  # no temporary file left behind


def test_a_damaged_cache_is_caught_by_its_checksum_and_rebuilt_readable_by_others(
    tmp_path, no_user_cache, caplog
):
    """Pixel bytes overwritten inside the cache file (torch.load still reads it): its digest
    no longer matches, so it is rebuilt from the images instead of trusted; cache files are
    readable by other users of a shared data folder (mode 0644 under the usual umask)."""
    root = tmp_path / "damaged"
    make_rgb_folder(root, {"a": (6, 2), "b": (6, 2)}, shape=(32, 32))  # pixels fill the file
    first = load_image_folder(root, progress=False)
    (cache,) = cache_files(root)
    umask = os.umask(0)
    os.umask(umask)
    assert cache.stat().st_mode & 0o777 == 0o666 & ~umask
    raw = bytearray(cache.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 300] = bytes(300)  # zeros in the middle of the pixel data
    cache.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="mwn.data.image_folder"):
        again = load_image_folder(root, progress=False)
    assert "damaged cache (its checksum does not match), rebuilding" in caplog.text
    assert torch.equal(again.train_x, first.train_x)


def test_cache_goes_to_the_user_folder_when_root_is_not_writable(
    tmp_path, no_user_cache, no_decode, caplog
):
    root = tmp_path / "readonly"
    make_rgb_folder(root, {"a": (1, 1)})
    (root / ".mwn-cache").write_text("a file where the cache folder would go")  # mkdir fails
    with caplog.at_level(logging.INFO, logger="mwn.data.image_folder"):
        first = load_image_folder(root, progress=False)
    user = tmp_path / "xdg" / "mwn"
    assert len(list(user.glob("readonly-native-*.pt"))) == 1
    assert f"image cache written to {user} ({root / '.mwn-cache'} is not writable)" in caplog.text
    no_decode()
    assert torch.equal(load_image_folder(root, progress=False).train_x, first.train_x)
    # an explicit cache_dir is used instead of both
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(AssertionError, match="the cache was not used"):
        load_image_folder(root, cache_dir=elsewhere, progress=False)


def test_the_user_cache_keeps_one_cache_per_folder_and_image_size(
    tmp_path, no_user_cache, no_decode
):
    """~/.cache/mwn is shared by every read-only dataset: a changed folder replaces its own
    older cache there, and another folder of the same name keeps its own."""
    user = tmp_path / "xdg" / "mwn"
    roots = [tmp_path / "one" / "data", tmp_path / "two" / "data"]  # same name, two folders
    for root in roots:
        make_rgb_folder(root, {"a": (1, 1)})
        (root / ".mwn-cache").write_text("not a folder")  # root's cache folder is unwritable
        load_image_folder(root, progress=False)
    assert len(list(user.glob("data-native-*.pt"))) == 2
    for n in range(3):  # the first folder changes three times
        write_image(roots[0] / f"train/a/new{n}.png", np.full((4, 5, 3), n, dtype=np.uint8))
        assert len(load_image_folder(roots[0], progress=False).train_y) == 2 + n
    assert len(list(user.glob("data-native-*.pt"))) == 2  # one each, not five
    no_decode()
    assert len(load_image_folder(roots[1], progress=False).train_y) == 1  # its cache, kept


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"{root}: image folder not found \(expected <root>/train/<class>/<image>"),
        ("no_test", r"{root}: not an image folder, no test/ folder in it; expected <root>/train/"),
        ("file_in_train", r"{root}/train/stray.png: a file directly in train/; expected <root>/"),
        ("no_classes", r"{root}/test: no class folders in it; expected"),
        ("corrupt_png", r"{root}/train/b/0.png: not a readable PNG or JPEG image \("),
        ("truncated_jpeg", r"{root}/test/a/0.jpg: not a readable PNG or JPEG image \("),
        ("empty_class", r"{root}/train/c: class 'c' has no images in train/$"),
        ("test_only_class", r"{root}/test/d: test class 'd' has no folder in {root}/train$"),
        ("other_file", r"{root}/train/a/notes.txt: not a PNG or JPEG name \(.png .jpg .jpeg\)"),
        ("bmp", r"{root}/test/a/x.bmp: not a PNG or JPEG name"),
    ],
)
def test_errors_are_one_line_and_name_the_folder_file_or_class(
    tmp_path, no_user_cache, case, message
):
    root = tmp_path / "bad"
    if case != "missing":
        make_rgb_folder(root, {"a": (1, 1), "b": (1, 1)})
    if case == "no_test":
        for p in (root / "test").rglob("*.png"):
            p.unlink()
        for d in sorted((root / "test").rglob("*"), reverse=True) + [root / "test"]:
            d.rmdir()
    elif case == "file_in_train":
        write_image(root / "train/stray.png", random_pixels(0, (4, 5, 3)))
    elif case == "no_classes":
        for name in ("a", "b"):
            (root / "test" / name / "0.png").unlink()
            (root / "test" / name).rmdir()
    elif case == "corrupt_png":
        (root / "train/b/0.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    elif case == "truncated_jpeg":
        write_image(root / "test/a/0.jpg", random_pixels(0, (4, 5, 3)))
        jpg = root / "test/a/0.jpg"
        jpg.write_bytes(jpg.read_bytes()[:-40])
    elif case == "empty_class":
        (root / "train/c").mkdir()
        (root / "train/c/.DS_Store").write_bytes(b"")  # hidden files do not count
        (root / "test/c").mkdir()
    elif case == "test_only_class":
        write_image(root / "test/d/0.png", random_pixels(0, (4, 5, 3)))
    elif case == "other_file":
        (root / "train/a/notes.txt").write_text("hello")
    elif case == "bmp":
        Image.fromarray(random_pixels(0, (4, 5, 3))).save(root / "test/a/x.bmp")
    with pytest.raises(DataError) as err:
        load_image_folder(root, progress=False)
    assert "\n" not in str(err.value)
    pattern = message.replace("{root}", str(root).replace("\\", "\\\\"))
    assert err.match(pattern), str(err.value)
    assert not (root / ".mwn-cache").exists()  # nothing cached for a folder that failed


def test_a_train_class_without_test_images_is_a_warning(tmp_path, no_user_cache, caplog):
    root = tmp_path / "partial"
    make_rgb_folder(root, {"a": (1, 1), "b": (2, 0), "c": (1, 1)})
    with caplog.at_level(logging.WARNING, logger="mwn.data.image_folder"):
        ds = load_image_folder(root, progress=False)
    assert f"{root / 'test'}: class 'b' has no test images" in caplog.text
    assert ds.num_classes == 3 and ds.test_y.tolist() == [0, 2]  # labels from the train list


def test_channel_stats_match_numpy_population_std_across_chunks(monkeypatch):
    x = torch.from_numpy(random_pixels(5, (37, 3, 6, 7)))
    x[:, 2] //= 3  # channels with different statistics
    ref = x.numpy().astype(np.float64) / 255
    want_mean = ref.mean(axis=(0, 2, 3))
    want_std = ref.std(axis=(0, 2, 3))  # ddof=0: population std
    monkeypatch.setattr(images, "STATS_CHUNK", 3 * 6 * 7 * 5)  # 5 images a chunk: 8 chunks
    mean, std = channel_stats(x)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, want_std, rtol=0, atol=1e-12)
    # population, not sample, std: two one-pixel images 0 and 255 -> std 0.5 exactly
    two = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert channel_stats(two) == ([0.5], [0.5])
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(x.float())


def test_cli_trains_on_an_image_folder_with_computed_normalisation(tmp_path):
    """dataset=image_folder end to end: the folder's classes, long tail and meta split, mean
    and std computed from the training split; a missing root is a one-line error."""
    root = tmp_path / "set"
    make_rgb_folder(root, {c: (14, 2) for c in "abc"}, shape=(8, 8))
    out = tmp_path / "run"
    args = [
        "dataset=image_folder",
        f"dataset.root={root}",
        "model=resnet8",
        "model.width=4",
        "meta_per_class=2",
        "imbalance=4",
        "batch_size=8",
        "meta_batch_size=6",
        "train_iters=2",
        "val_every=2",
        "device=cpu",
        f"hydra.run.dir={out}",
    ]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "set" and summary["test_size"] == 6
    assert summary["train_class_counts"] == [12, 6, 3]  # 12 * 4^(-c/2)
    x = torch.stack([chw(np.asarray(Image.open(p))) for p in sorted(root.glob("train/*/*"))])
    mean, _ = channel_stats(x)
    assert f"dataset.mean={[round(m, 4) for m in mean]}" in proc.stdout + proc.stderr
    missing = run_cli("dataset=image_folder", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith("mwn: error: dataset.root: required with dataset=image_folder")
    )
