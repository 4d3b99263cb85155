"""Image folders as a dataset: `root/train/<class>/<image>` and `root/test/<class>/<image>`
(torchvision's ImageFolder layout), decoded once into uint8 tensors and cached. Two more splits
are read when they are there: `root/meta/<class>/` (a trusted, hand-checked meta set: used whole
as the meta set, never trained on) and `root/val/<class>/` (a validation set, on which the best
iteration is chosen).

Rules (each broken one is a one-line DataError naming the folder, file or class):
- images are PNG or JPEG by name (.png .jpg .jpeg, any case); hidden names (starting with '.',
  e.g. .DS_Store, ._x.jpg, .ipynb_checkpoints) and Windows' Thumbs.db / desktop.ini are ignored;
  any other file under train/ or test/ is an error naming it (rename it to a hidden name or move
  it out), never silently skipped. Class folders may hold subfolders (read recursively, as
  torchvision does);
- classes are the folder names under train/, sorted; a class's index is its position in that
  list. A test, meta or val class without a train folder is an error; a train class without a
  test, meta or val folder is allowed (a warning; it has no images there, so its per-class test
  accuracy means nothing, or the meta set does not show it); a class folder without images is
  an error;
- images become RGB (3 channels, alpha dropped, palettes expanded) unless every image of every
  split is greyscale (PIL modes 1, L, LA, I, I;16): then 1 channel. 16-bit greyscale keeps its
  high byte. EXIF orientation is not applied (as torchvision's loader);
- with `image_size`, every image is resized to image_size x image_size (PIL bilinear, which
  antialiases when shrinking, as torchvision's Resize on PIL images; the aspect ratio is not
  kept); without it, every image must have the same size.

The cache is one torch.save file of the tensors and class names, keyed by a hash of the splits,
the sorted relative paths, sizes and mtimes of the images, image_size and FORMAT_VERSION: any
added, removed, renamed or rewritten image (new mtime) makes a new cache. It lives in
`root/.mwn-cache/` (or `cache_dir`), else in the user cache folder ($XDG_CACHE_HOME/mwn or
~/.cache/mwn) when root is read-only; a new cache replaces the older ones of the same folder (by
absolute path) and image_size there, so neither place grows as a dataset changes. A corrupt,
damaged (its SHA-256 of the decoded pixels and labels does not match) or foreign cache file is
ignored and rebuilt. The key sees an image whose content changes but whose size and
modification time stay the same (a restored mtime) as unchanged: delete the cache folder after
such an edit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mwn.data.images import DataError, ImageSet, Split

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORED_NAMES = ("thumbs.db", "desktop.ini")  # compared lower-case; plus every name with a '.'
FORMAT_VERSION = 3  # bump when decoding or the cache's contents change (2: a content digest;
# 3: the meta/ and val/ splits)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
LAYOUT = (
    "expected <root>/train/<class>/<image> and <root>/test/<class>/<image> (PNG or JPEG), and "
    "optionally <root>/meta/<class>/ and <root>/val/<class>/"
)
OPTIONAL_SPLITS = ("meta", "val")  # read when the folder is there


@dataclass
class _Split:
    """The image files of one split: paths sorted by (class, path) and their labels."""

    files: list[Path]
    labels: list[int]


def load_image_folder(
    root: str | Path,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ImageSet:
    """The images under root/train and root/test (and root/meta, root/val when there) as an
    ImageSet named after the folder, from the cache when the folder has not changed since it was
    written (see the module docstring)."""
    root = Path(root).expanduser()
    classes, splits = list_image_folder(root)
    names = list(splits)
    key = _cache_key(root, splits, image_size)
    place = root.resolve()
    where = hashlib.sha256(str(place).encode()).hexdigest()[:8]  # this folder's own
    stem = f"{_safe(place.name)}-{image_size or 'native'}-{where}-{key[:20]}"
    dirs = [Path(cache_dir).expanduser()] if cache_dir is not None else _default_cache_dirs(root)
    pixels = None
    for folder in dirs:
        pixels = _read_cache(folder / f"{stem}.pt", key, classes, names)
        if pixels is not None:
            log.info(
                "%s: %s images from the cache %s",
                root,
                ", ".join(f"{len(pixels[n][1])} {n}" for n in names),
                folder / f"{stem}.pt",
            )
            break
    if pixels is None:
        xs = _decode_all(root, splits, image_size, progress)
        pixels = {n: (x, torch.tensor(splits[n].labels, dtype=torch.int64)) for n, x in xs.items()}
        _write_cache(dirs, stem, key, classes, place.name, pixels)
        log.info(
            "%s: %d classes, %s images of %s",
            root,
            len(classes),
            ", ".join(f"{len(splits[n].files)} {n}" for n in names),
            "x".join(map(str, pixels["train"][0].shape[1:])),
        )
    files = {n: [p.relative_to(root).as_posix() for p in splits[n].files] for n in names}
    extra = {n: Split(*pixels[n], files[n]) if n in pixels else None for n in OPTIONAL_SPLITS}
    return ImageSet(
        root.resolve().name,
        len(classes),
        *pixels["train"],
        *pixels["test"],
        classes=classes,
        train_files=files["train"],
        test_files=files["test"],
        **extra,
    )


# ---------------------------------------------------------------- the folder's files


def list_image_folder(root: Path) -> tuple[list[str], dict[str, _Split]]:
    """The class names and each split's image files and labels (train, test, then meta and val
    when there), the layout rules checked (see the module docstring)."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found ({LAYOUT})")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: not an image folder, no {split}/ folder in it; {LAYOUT}")
    classes = _classes(root / "train")
    names = ["train", "test", *(s for s in OPTIONAL_SPLITS if (root / s).is_dir())]
    for split in names[1:]:
        present = _classes(root / split)
        for name in present:
            if name not in classes:
                raise DataError(
                    f"{root / split / name}: {split} class {name!r} has no folder in "
                    f"{root / 'train'}"
                )
        for name in classes:
            if name not in present:
                log.warning("%s: class %r has no %s images", root / split, name, split)
    return classes, {split: _list_split(root / split, classes) for split in names}


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _classes(split: Path) -> list[str]:
    """The sorted class folder names of a split; a file directly in it is a layout error."""
    names = []
    for entry in sorted(split.iterdir()):
        if _hidden(entry.name):
            continue
        if not entry.is_dir():
            raise DataError(f"{entry}: a file directly in {split.name}/; {LAYOUT}")
        names.append(entry.name)
    if not names:
        raise DataError(f"{split}: no class folders in it; {LAYOUT}")
    return names


def _list_split(split: Path, classes: list[str]) -> _Split:
    """Every image of the split's class folders (recursively, hidden names skipped)."""
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = split / name
        if not folder.is_dir():
            continue  # a train class without test images: warned about by the caller
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _hidden(d)]
            for f in filenames:
                if _hidden(f):
                    continue
                path = Path(dirpath) / f
                if path.suffix.lower() not in SUFFIXES:
                    raise DataError(
                        f"{path}: not a PNG or JPEG name (.png .jpg .jpeg); convert it, move "
                        "it out, or hide it (a name starting with '.')"
                    )
                found.append(path)
        if not found:
            raise DataError(f"{folder}: class {name!r} has no images in {split.name}/")
        found.sort()
        files += found
        labels += [label] * len(found)
    return _Split(files, labels)


def _cache_key(root: Path, splits: dict[str, _Split], image_size: int | None) -> str:
    """sha256 over the format version, image_size, the splits and each image's relative path,
    label, size and mtime (ns): any change to what would be decoded changes the key."""
    h = hashlib.sha256(f"mwn-image-folder {FORMAT_VERSION} {image_size}\n".encode())
    for name, split in splits.items():
        h.update(f"split {name}\n".encode())
        for path, label in zip(split.files, split.labels):
            st = path.stat()
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "images"


def _default_cache_dirs(root: Path) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mwn"
    return [root / ".mwn-cache", user]


# ---------------------------------------------------------------- decoding


def _decode(path: Path, image_size: int | None) -> np.ndarray:
    """One image as uint8 (H, W) if greyscale, else (H, W, 3); resized when image_size is set."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey: keep the high byte
                grey = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
                img = Image.fromarray(grey.astype(np.uint8), mode="L")
            elif img.mode != "L":
                img = img.convert("L" if img.mode in GREY_MODES else "RGB")
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        raise DataError(f"{path}: not a readable PNG or JPEG image ({reason})") from e


def decode_image(path: Path, image_size: int | None = None, grey: bool = False) -> np.ndarray:
    """One image decoded as the folder's images are (uint8 (H, W) if greyscale, else (H, W, 3);
    resized when image_size is set); with `grey`, a colour image is converted to grey (PIL's L)."""
    a = _decode(path, image_size)
    if grey and a.ndim == 3:
        a = np.asarray(Image.fromarray(a, mode="RGB").convert("L"), dtype=np.uint8)
    return a


def _decode_all(
    root: Path, splits: dict[str, _Split], image_size: int | None, progress: bool
) -> dict[str, torch.Tensor]:
    """Decode every split into uint8 (N, C, H, W): 1 channel while every image so far is grey,
    3 (greys replicated, as PIL's L -> RGB) from the first colour image on, for every split."""
    from tqdm import tqdm

    first: tuple[Path, tuple[int, int]] | None = None  # (file, (H, W)) every image must match
    bar = tqdm(
        total=sum(len(s.files) for s in splits.values()),
        desc=f"decoding {root.name}",
        unit="img",
        dynamic_ncols=True,
        disable=not progress,
    )
    out = {}
    with bar:
        for name, split in splits.items():
            buf: np.ndarray | None = None
            for i, path in enumerate(split.files):
                a = _decode(path, image_size)
                if first is None:
                    first = (path, a.shape[:2])
                elif a.shape[:2] != first[1]:
                    (h0, w0), (h, w) = first[1], a.shape[:2]
                    raise DataError(
                        f"{first[0]} is {w0}x{h0} but {path} is {w}x{h}: images differ in size; "
                        "set dataset.image_size=N to resize every image to N x N"
                    )
                if buf is None:
                    buf = np.empty((len(split.files), 1, *a.shape[:2]), dtype=np.uint8)
                if a.ndim == 3 and buf.shape[1] == 1:
                    buf = np.repeat(buf, 3, axis=1)  # the first colour image: grey so far -> RGB
                buf[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a
                bar.update()
            out[name] = buf
    if len({a.shape[1] for a in out.values()}) > 1:  # some splits all grey, others not: RGB
        out = {n: np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a for n, a in out.items()}
    return {n: torch.from_numpy(a) for n, a in out.items()}


# ---------------------------------------------------------------- the cache


Pixels = dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (uint8 images, labels)


def _read_cache(path: Path, key: str, classes: list[str], names: list[str]) -> Pixels | None:
    """The cached splits if `path` holds a well-formed cache for `key`, else None (with a
    warning when a file is there but unusable)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        pixels = {n: tuple(entry["splits"][n]) for n in names}
        xs = [x for x, _ in pixels.values()]
        ok = (
            entry["version"] == FORMAT_VERSION
            and entry["key"] == key
            and entry["classes"] == classes
            and list(entry["splits"]) == names
            and all(x.dtype == torch.uint8 and x.dim() == 4 for x in xs)
            and all(x.shape[1:] == xs[0].shape[1:] for x in xs)
            and all(y.dtype == torch.int64 and y.shape == (len(x),) for x, y in pixels.values())
        )
        if ok and entry["digest"] != _digest(pixels):  # pixels or labels changed on disk
            log.warning("%s: damaged cache (its checksum does not match), rebuilding", path)
            return None
    except Exception as e:  # truncated, not a torch file, missing keys: rebuild
        log.warning(
            "%s: unreadable cache ignored, rebuilding (%s: %s)",
            path,
            type(e).__name__,
            " ".join(str(e).split())[:200],
        )
        return None
    if not ok:
        log.warning("%s: cache does not match the folder, ignored, rebuilding", path)
        return None
    return pixels


def _digest(pixels: Pixels) -> str:
    """SHA-256 of the splits' names and tensors' bytes (about 0.2 s for CIFAR-10's 176 MB)."""
    h = hashlib.sha256()
    for name, tensors in pixels.items():
        h.update(name.encode())
        for t in tensors:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_cache(
    dirs: list[Path],
    stem: str,
    key: str,
    classes: list[str],
    name: str,
    pixels: Pixels,
) -> None:
    """torch.save to a temporary file then os.replace (readers never see half a file), in the
    first of `dirs` that can be written. Older caches there of the same folder (its absolute
    path, in the stem) and image_size are removed: they describe contents it no longer has, and
    a shared user cache folder does not grow with every change of every dataset."""
    entry = {
        "version": FORMAT_VERSION,
        "key": key,
        "name": name,
        "classes": classes,
        "splits": pixels,
        "digest": _digest(pixels),
    }
    umask = os.umask(0)
    os.umask(umask)
    for n, folder in enumerate(dirs):
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
            os.chmod(tmp, 0o666 & ~umask)  # readable as any new file (mkstemp makes it 0600)
            os.replace(tmp, folder / f"{stem}.pt")
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            log.warning(
                "cannot write the image cache in %s (%s)%s",
                folder,
                e,
                "; trying the next" if n + 1 < len(dirs) else "; not cached",
            )
            continue
        if n > 0:
            log.info("image cache written to %s (%s is not writable)", folder, dirs[0])
        else:
            log.info("image cache written to %s", folder / f"{stem}.pt")
        for old in folder.glob(f"{stem.rsplit('-', 1)[0]}-*.pt"):
            if old.name != f"{stem}.pt":
                old.unlink(missing_ok=True)
        return
