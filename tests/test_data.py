import pickle

import numpy as np
import pytest
import torch

from mwn.data import readers as data
from mwn.data.batches import DeviceImages, Sampler, random_crop
from mwn.data.images import DataError
from mwn.data.readers import load_cifar, load_digits, load_fashion_mnist
from mwn.data.splits import long_tail_counts, make_long_tail, split_meta
from mwn.seeds import ONCE, Stream, generator, step_generator

from conftest import write_cifar, write_idx


def test_long_tail_counts_match_the_reference_example():
    assert long_tail_counts(4900, 10, 100) == [4900, 2937, 1760, 1055, 632, 379, 227, 136, 81, 49]
    assert long_tail_counts(4990, 10, 1) == [4990] * 10
    assert long_tail_counts(500, 100, 50)[-1] == 10
    counts = long_tail_counts(1000, 10, 12.5)  # any real factor
    assert counts[0] == 1000 and counts[-1] == 80


def test_meta_split_is_disjoint_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500)]
    meta, rest = split_meta(labels, 10, 7, seed=3)
    assert len(set(meta.tolist()) & set(rest.tolist())) == 0
    assert sorted(meta.tolist() + rest.tolist()) == list(range(500))
    assert torch.bincount(labels[meta], minlength=10).tolist() == [7] * 10
    assert torch.equal(meta, split_meta(labels, 10, 7, seed=3)[0])
    assert not torch.equal(meta, split_meta(labels, 10, 7, seed=4)[0])
    message = (
        r"meta_per_class=50: class '0' has only 50 training images and 1 must stay for "
        r"training; allowed values are 1 <= meta_per_class <= 49$"
    )
    with pytest.raises(DataError, match=message):
        split_meta(labels, 10, 50, seed=0)


def test_long_tail_subsample_has_the_counts_and_comes_from_the_pool():
    labels = torch.arange(10).repeat_interleave(200)
    meta, pool = split_meta(labels, 10, 10, seed=0)
    kept, counts = make_long_tail(labels, pool, 10, 100.0, seed=0)
    assert counts == long_tail_counts(190, 10, 100.0)
    assert torch.bincount(labels[kept], minlength=10).tolist() == counts
    assert set(kept.tolist()) <= set(pool.tolist())
    with pytest.raises(DataError, match=r"imbalance=500: leaves the last class"):
        make_long_tail(labels, pool, 10, 500.0, seed=0)


def test_a_per_class_cap_sets_n_max_when_it_is_smaller_than_the_pool():
    labels = torch.arange(10).repeat_interleave(200)
    _, pool = split_meta(labels, 10, 10, seed=0)
    kept, counts = make_long_tail(labels, pool, 10, 10.0, seed=0, per_class_cap=50)
    assert counts == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]  # int(50 * 10^(-c/9)), by hand
    assert torch.bincount(labels[kept], minlength=10).tolist() == counts
    assert set(kept.tolist()) <= set(pool.tolist())
    full, _ = make_long_tail(labels, pool, 10, 10.0, seed=0, per_class_cap=190)
    assert torch.equal(full, make_long_tail(labels, pool, 10, 10.0, seed=0)[0])  # cap = n_max
    wide, _ = make_long_tail(labels, pool, 10, 1.0, seed=0, per_class_cap=10_000)  # above n_max
    assert len(wide) == 1900
    with pytest.raises(DataError, match=r"imbalance=100: leaves the last class.*n_max=50"):
        make_long_tail(labels, pool, 10, 100.0, seed=0, per_class_cap=50)


def test_sampler_epochs_are_permutations_and_batches_replayable():
    s = Sampler(250, 100, seed=1, stream=0, what="batch_size")
    epoch0 = torch.cat([s.indices(0), s.indices(1)])
    assert len(set(epoch0.tolist())) == 200  # no repeats within an epoch (last 50 dropped)
    fresh = Sampler(250, 100, seed=1, stream=0, what="batch_size")
    assert torch.equal(fresh.indices(3), s.indices(3))  # batch k depends only on k
    assert not torch.equal(s.indices(0), s.indices(2))  # a new permutation each epoch
    with pytest.raises(DataError, match=r"meta_batch_size=300: only 250 images"):
        Sampler(250, 300, seed=1, stream=0, what="meta_batch_size")


def test_random_crop_matches_torchvision_semantics_and_is_uniform():
    """Each crop is padded[i:i+H, j:j+W] of the zero-padded image, offsets uniform on 0..2p."""
    h = w = 6
    p = 2
    base = (torch.arange(h * w, dtype=torch.uint8) + 1).view(1, 1, h, w)
    x = base.repeat(4000, 2, 1, 1)
    out = random_crop(x, p, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(base, (p,) * 4)
    windows = {
        (i, j): padded[0, 0, i : i + h, j : j + w]
        for i in range(2 * p + 1)
        for j in range(2 * p + 1)
    }
    counts = dict.fromkeys(windows, 0)
    for img in out:
        assert torch.equal(img[0], img[1])  # one offset for all channels of an image
        match = [k for k, win in windows.items() if torch.equal(img[0], win)]
        assert len(match) == 1
        counts[match[0]] += 1
    expected = 4000 / 25
    assert all(abs(c - expected) < 5 * expected**0.5 for c in counts.values()), counts


def test_device_batches_normalise_and_flip():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2).repeat(500, 1, 1, 1)
    y = torch.arange(1000) % 10
    ds = DeviceImages(x, y, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], torch.device("cpu"))
    xb, yb = ds.batch(torch.tensor([0, 3]))
    torch.testing.assert_close(xb, (x[[0, 3]].float() / 255 - 0.5) / 0.25)
    assert yb.tolist() == [0, 3]
    xf, _ = ds.batch(
        torch.arange(1000), flip=True, gen=step_generator(0, Stream.TRAIN_AUG, 5, ds.device)
    )
    ref = (x.float() / 255 - 0.5) / 0.25
    flipped = (xf == ref.flip(3)).flatten(1).all(1)
    assert ((xf == ref).flatten(1).all(1) | flipped).all()
    assert 400 < int(flipped.sum()) < 600
    with pytest.raises(DataError, match="one per channel"):
        DeviceImages(x, y, [0.5], [0.25], torch.device("cpu"))


def test_digits_are_bundled_with_a_fixed_split():
    ds = load_digits()
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert torch.bincount(ds.test_y).tolist() == [50] * 10
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.train_x.dtype == torch.uint8
    assert int(ds.train_x.max()) == 255
    assert torch.equal(load_digits().test_x, ds.test_x)


def test_cifar_reader_loads_well_formed_files_with_a_checksum_warning(tmp_path):
    folder = write_cifar(tmp_path, "cifar10", per_class=12)
    with pytest.warns(UserWarning, match="MD5 of data_batch_1, .*test_batch differs"):
        ds = data.load_dataset("cifar10", tmp_path, download=False)
    assert ds.num_classes == 10 and ds.train_x.shape == (120, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [12] * 10
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    # channel-major rows: the first 1024 bytes are the red plane of image 0
    assert torch.equal(ds.train_x[0, 0].flatten(), torch.from_numpy(first[b"data"][0, :1024]))
    assert ds.train_y[: len(first[b"labels"])].tolist() == first[b"labels"]
    assert ds.test_x.shape == (30, 3, 32, 32)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar100", per_class=2, test_per_class=1)
    with pytest.warns(UserWarning):
        ds = load_cifar(tmp_path, "cifar100", download=False)
    assert ds.num_classes == 100 and torch.bincount(ds.train_y).tolist() == [2] * 100


def test_cifar_reader_accepts_batches_pickled_by_python3_with_str_keys(tmp_path):
    """Files re-saved by Python 3 (pickle.dump of a dict with str keys) load like the originals;
    a str-keyed file without the label key is still refused."""
    folder = write_cifar(tmp_path, "cifar100", per_class=2, test_per_class=1)
    originals = {}
    for f in folder.iterdir():
        entry = pickle.loads(f.read_bytes())
        originals[f.name] = entry
        f.write_bytes(pickle.dumps({k.decode(): v for k, v in entry.items()}, protocol=4))
    with pytest.warns(UserWarning, match="MD5"):
        ds = load_cifar(tmp_path, "cifar100", download=False)
    first = originals["train"]
    assert ds.train_y.tolist() == first[b"fine_labels"]
    assert torch.equal(ds.train_x.flatten(1), torch.from_numpy(first[b"data"]))
    assert ds.test_y.tolist() == originals["test"][b"fine_labels"]
    (folder / "test").write_bytes(pickle.dumps({"data": first[b"data"], "labels": [0]}))
    with pytest.raises(
        DataError,
        match=r"test: malformed CIFAR batch, needs keys 'data' and "
        r"'fine_labels'",
    ):
        load_cifar(tmp_path, "cifar100", download=False)


def test_cifar_reader_errors_name_the_folder_and_the_file(tmp_path):
    with pytest.raises(
        DataError,
        match=r"cifar10 files not found in .*cifar-10-batches-py: "
        r"missing data_batch_1, .*test_batch",
    ):
        load_cifar(tmp_path, "cifar10", download=False)
    folder = write_cifar(tmp_path, "cifar10", per_class=2)
    bad = {b"data": np.zeros((5, 100), dtype=np.uint8), b"labels": [0] * 5}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"data_batch_3: 'data' must"):
        load_cifar(tmp_path, "cifar10", download=False)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR"):
        load_cifar(tmp_path, "cifar10", download=False)
    bad = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 10]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"labels must be 2 integers"):
        load_cifar(tmp_path, "cifar10", download=False)


def test_fashion_mnist_reads_idx_files_and_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"Fashion-MNIST not found: .*nowhere"):
        load_fashion_mnist(tmp_path, download=False)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs[:5])
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    ds = load_fashion_mnist(tmp_path, download=False)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_y.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(ds.train_x[3, 0], torch.from_numpy(imgs[3].astype(np.uint8)))
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-5])  # truncated
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: unreadable"):
        load_fashion_mnist(tmp_path, download=False)


def test_a_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"dataset.download=true: downloading cifar10 into "):
        load_cifar(tmp_path, "cifar10", download=True)


def test_every_random_stream_is_its_own():
    """Each named start-up draw and each per-iteration stream gives different numbers for the
    same seed, and the same numbers for the same (seed, name) or (seed, stream, step)."""
    draws = [torch.rand(4, generator=generator(7, name)) for name in ONCE]
    draws += [torch.rand(4, generator=step_generator(7, s, 3)) for s in Stream]
    assert len({tuple(d.tolist()) for d in draws}) == len(ONCE) + len(Stream)
    again = torch.rand(4, generator=step_generator(7, Stream.META_AUG, 3))
    assert torch.equal(again, draws[len(ONCE) + int(Stream.META_AUG)])
    assert not torch.equal(torch.rand(4, generator=step_generator(7, Stream.META_AUG, 4)), again)


def test_the_largest_imbalance_named_in_the_error_really_works():
    """n_max * n_max^-1 rounds below 1 for some n_max (49 among them): the error then says <."""
    labels = torch.arange(10).repeat_interleave(49)
    pool = torch.arange(len(labels))
    own = r", or null \(the data's own class counts\)$"
    with pytest.raises(DataError, match=r"allowed values are 1 <= imbalance < 49" + own):
        make_long_tail(labels, pool, 10, 49.0, seed=0)
    _, counts = make_long_tail(labels, pool, 10, 48.999, seed=0)
    assert counts[-1] == 1
    labels = torch.arange(10).repeat_interleave(50)
    with pytest.raises(DataError, match=r"allowed values are 1 <= imbalance <= 50" + own):
        make_long_tail(labels, torch.arange(500), 10, 51.0, seed=0)
    assert make_long_tail(labels, torch.arange(500), 10, 50.0, seed=0)[1][-1] == 1
