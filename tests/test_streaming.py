"""Image folders streamed from disk: decoded as the in-memory reader decodes them, and batches
bit-identical to the device-resident ones for the same seed."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mwn import bench, seeds
from mwn.data.batches import DeviceImages, Sampler
from mwn.data.image_folder import _decode, load_image_folder
from mwn.data.images import DataError, channel_stats
from mwn.data.streaming import FileImages, StreamedImages, file_channel_stats, probe_files
from mwn.seeds import Stream

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def write(path: Path, size=(8, 8), mode="RGB", seed=0) -> Path:
    """A random image of `size` (W, H) in `mode`, saved as its suffix says."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "RGB":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def folder(root: Path, modes_by_class: dict, size=(8, 8), test_mode="RGB") -> Path:
    """root/train/<class>/ with one file per (mode, suffix) given, root/test/<class>/ one each."""
    n = 0
    for name, entries in modes_by_class.items():
        for mode, suffix in entries:
            write(root / "train" / name / f"{n:03d}{suffix}", size, mode, seed=n)
            n += 1
        write(root / "test" / name / f"t{n:03d}.png", size, test_mode, seed=n)
        n += 1
    return root


def file_set(n: int, root: Path, size=(8, 8)) -> FileImages:
    files = [write(root / f"{i:03d}.png", size, seed=i) for i in range(n)]
    channels, hw = probe_files(files, None)
    return FileImages(files, None, channels, hw)


def read_folder(root: Path, image_size=None):
    images = load_image_folder(root, image_size, cache_dir=root / "cache", progress=False)
    train = [root / f for f in images.train_files]
    test = [root / f for f in images.test_files]
    channels, hw = probe_files(train + test, image_size)
    split = lambda files: FileImages(files, image_size, channels, hw)
    return images, split(train), split(test)


MIXED = {
    "cat": [("RGB", ".png"), ("L", ".png"), ("RGB", ".jpg"), ("RGBA", ".png")],
    "dog": [("L", ".jpeg"), ("P", ".png"), ("I;16", ".png")],
}


def test_decoding_is_the_image_folders(tmp_path):
    images, train, test = read_folder(folder(tmp_path, MIXED))
    assert train.shape == images.train_x.shape and train.shape[1] == 3
    assert torch.equal(train.load(), images.train_x)
    assert torch.equal(test.load(), images.test_x)
    assert torch.equal(train.decode(2), images.train_x[2])


def test_resized_and_all_grey_sets_decode_as_the_image_folder(tmp_path):
    grey = {"a": [("L", ".png"), ("I;16", ".png")], "b": [("L", ".jpg")]}
    images, train, test = read_folder(folder(tmp_path / "grey", grey, test_mode="L"))
    assert train.shape[1] == 1 and torch.equal(train.load(), images.train_x)
    assert torch.equal(test.load(), images.test_x)
    root = folder(tmp_path / "sizes", MIXED)
    write(root / "train" / "cat" / "big.png", (13, 9), "RGB", seed=99)
    images, train, test = read_folder(root, image_size=6)
    assert train.shape == (8, 3, 6, 6) and torch.equal(train.load(), images.train_x)
    assert torch.equal(test.load(), images.test_x)


def test_a_grey_image_in_a_colour_set_is_replicated(tmp_path):
    files = [write(tmp_path / "c.png", mode="RGB"), write(tmp_path / "g.jpg", mode="L", seed=1)]
    assert probe_files(files, None) == (3, (8, 8))
    x = FileImages(files, None, 3, (8, 8)).decode(1)
    grey = _decode(files[1], None)
    assert torch.equal(x, torch.from_numpy(np.repeat(grey[None], 3, axis=0)))
    with pytest.raises(DataError, match="c.png: a colour image in a set of greyscale"):
        FileImages(files, None, 1, (8, 8)).decode(0)


def test_sizes_that_differ_name_both_files(tmp_path):
    a = write(tmp_path / "a.png", (8, 8))
    b = write(tmp_path / "b.jpg", (9, 7))
    with pytest.raises(DataError) as e:
        probe_files([a, b], None)
    message = str(e.value)
    assert "\n" not in message and "a.png is 8x8" in message and "b.jpg is 9x7" in message
    assert "set dataset.image_size=N" in message
    assert probe_files([a, b], 5) == (3, (5, 5))


def test_file_images_pickle_and_index_files(tmp_path):
    images = file_set(6, tmp_path)
    copy = pickle.loads(pickle.dumps(images))
    assert copy.files == images.files and copy.shape == images.shape == (6, 3, 8, 8)
    picked = images[torch.tensor([4, 1, 1])]
    assert picked.files == [images.files[i] for i in (4, 1, 1)] and len(picked) == 3
    assert images[[5, 0]].files == [images.files[5], images.files[0]]
    assert images[1:3].files == images.files[1:3]
    assert images[torch.arange(6) % 2 == 0].files == images.files[::2]
    assert torch.equal(picked.load(), images.load()[torch.tensor([4, 1, 1])])


def streamed_and_device(tmp_path, n=40, **kw):
    images = file_set(n, tmp_path)
    y = torch.arange(n) % 5
    device = torch.device("cpu")
    return StreamedImages(images, y, MEAN, STD, device, **kw), DeviceImages(
        images.load(), y, MEAN, STD, device
    )


def same_batch(a, b, idx, it, seed=3, **kw):
    ga = seeds.step_generator(seed, Stream.TRAIN_AUG, it)
    gb = seeds.step_generator(seed, Stream.TRAIN_AUG, it)
    xa, ya = a.batch(idx, 4, True, ga, **kw)
    xb, yb = b.batch(idx, 4, True, gb, **kw)
    # the same draws, in the same order: the generators end in the same state
    same_draws = torch.equal(ga.get_state(), gb.get_state())
    return torch.equal(xa, xb) and torch.equal(ya, yb) and same_draws


@pytest.mark.parametrize("workers", [2, 0])
def test_planned_batches_are_the_device_ones(tmp_path, workers):
    streamed, device = streamed_and_device(tmp_path, workers=workers, prefetch=3)
    sampler = Sampler(len(device), 8, 3, Stream.TRAIN_BATCHES, "batch_size")
    rng = torch.get_rng_state()
    with streamed:
        streamed.plan(sampler.indices, 0, 12)  # 12 iterations: across an epoch's end (5)
        for it in range(12):
            assert same_batch(streamed, device, sampler.indices(it), it)
        assert (streamed.hits, streamed.misses) == (12, 0)
        # past the plan's end: decoded directly
        assert same_batch(streamed, device, sampler.indices(12), 12)
        assert streamed.misses == 1
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is not drawn from


def test_shards_and_unplanned_batches_are_the_device_ones(tmp_path):
    streamed, device = streamed_and_device(tmp_path, workers=2)
    sampler = Sampler(len(device), 8, 3, Stream.TRAIN_BATCHES, "batch_size")
    rows = slice(2, 6)  # rank 1 of 2 of a global batch of 8 is slice(4, 8); any slice will do
    with streamed:
        streamed.plan(sampler.indices, 3, 9, rows)
        for it in range(3, 9):
            if it == 5:  # not the planned batch: decoded now, and the plan waits
                assert same_batch(streamed, device, sampler.indices(20), it, rows=rows)
            assert same_batch(streamed, device, sampler.indices(it), it, rows=rows)
            assert same_batch(streamed, device, sampler.indices(it), it, rows=slice(None))
        assert streamed.hits == 6 and streamed.misses == 7
        x, y = streamed.batch(sampler.indices(0), rows=slice(4, 8))
        assert torch.equal(x, device.batch(sampler.indices(0), rows=slice(4, 8))[0])


def test_in_order_and_channel_stats_are_the_device_ones(tmp_path):
    streamed, device = streamed_and_device(tmp_path, n=23, workers=2)
    with streamed:
        got, want = list(streamed.in_order(10)), list(device.in_order(10))
    assert len(got) == len(want) == 3
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(got, want))
    assert streamed.image_shape == (3, 8, 8) and len(streamed) == 23
    stats = channel_stats(device.x)
    assert file_channel_stats(streamed.images, workers=2, batch_size=7) == stats
    assert file_channel_stats(streamed.images, workers=0) == stats


def test_a_broken_file_is_a_one_line_error_from_the_workers(tmp_path):
    streamed, _ = streamed_and_device(tmp_path, n=10, workers=2)
    streamed.images.files[7].write_bytes(streamed.images.files[7].read_bytes()[:60])
    with streamed, pytest.raises(DataError, match="007.png: not a readable") as e:
        list(streamed.in_order(4))
    assert "\n" not in str(e.value)


def test_the_plan_pickles_for_spawned_workers(tmp_path):
    streamed, device = streamed_and_device(tmp_path, n=16, workers=1)
    sampler = Sampler(16, 4, 3, Stream.TRAIN_BATCHES, "batch_size")
    assert torch.equal(pickle.loads(pickle.dumps(sampler.indices))(9), sampler.indices(9))
    streamed.context = "spawn"  # each worker a fresh interpreter: everything it gets pickled
    with streamed:
        streamed.plan(sampler.indices, 0, 2)
        assert all(same_batch(streamed, device, sampler.indices(it), it) for it in range(2))
        assert streamed.hits == 2


def test_bench_times_streamed_batches(tmp_path, capsys):
    tiny = "--depth 8 --width 4 --shape 3,8,8 --batch-size 16 --iters 2 --warmup 1 --no-memory"
    args = [*tiny.split(), "--variants", "erm", "--json", str(tmp_path / "b.json")]
    report = bench.main([*args, "--stream", "--stream-images", "40", "--stream-workers", "1"])
    st = report["stream"]
    assert st["workers"] == 1 and st["images"] == 40 and st["planned_batches_used"] == 3
    assert set(st["images_per_s"]) == {"device", "streamed"} and st["streamed_over_device"] > 0
    assert "streamed from disk, 1 worker " in capsys.readouterr().out
    assert "stream" not in bench.main(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_the_device_ones(tmp_path):
    images = file_set(24, tmp_path)
    y, cuda = torch.arange(24) % 5, torch.device("cuda")
    streamed = StreamedImages(images, y, MEAN, STD, cuda, workers=2)
    device = DeviceImages(images.load(), y, MEAN, STD, cuda)
    sampler = Sampler(24, 8, 3, Stream.TRAIN_BATCHES, "batch_size")
    with streamed:
        streamed.plan(sampler.indices, 0, 4)
        for it in range(4):
            ga = seeds.step_generator(3, Stream.TRAIN_AUG, it, cuda)
            gb = seeds.step_generator(3, Stream.TRAIN_AUG, it, cuda)
            a, b = (
                streamed.batch(sampler.indices(it), 4, True, ga),
                device.batch(sampler.indices(it), 4, True, gb),
            )
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert streamed.hits == 4
