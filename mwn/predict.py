"""`python -m mwn.predict RUN_DIR IMAGES...`: apply a finished run's classifier to image files.

IMAGES are PNG or JPEG files, or folders searched recursively. Each image is decoded and
normalised as the run's dataset images were (its image_size, channels, mean and std) and
classified in eval mode; the CSV gets one row per image: its file, the predicted class's name
and index, and that class's softmax probability (with --probs, every class's probability too).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from mwn.config import ConfigError
from mwn.data.images import DataError
from mwn.run.evaluate import predict
from mwn.run.trained import RunError, as_batches, image_files, load_images, load_trained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwn.predict", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished run's folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", type=Path, help="CSV to write (RUN_DIR/predictions.csv)")
    p.add_argument("--probs", action="store_true", help="every class's probability too")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default cpu)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size}: allowed values are integers >= 1")
    try:
        device = torch.device(args.device)
        trained = load_trained(args.run_dir)
        files = image_files(args.images)
        x = load_images(files, trained.preprocess)
    except (RunError, DataError, ConfigError, RuntimeError) as e:
        print(f"python -m mwn.predict: error: {e}", file=sys.stderr)
        return 2
    model = trained.model.to(device)
    state = dict(model.named_parameters()), dict(model.named_buffers())
    logits = predict(model, *state, as_batches(x, trained.preprocess, device), args.batch_size)
    probs = logits.softmax(1).cpu()
    model.eval()
    out = args.output or args.run_dir / "predictions.csv"
    classes = trained.classes
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "predicted", "class", "probability", *(args.probs and classes or [])])
        for path, row in zip(files, probs):
            c = int(row.argmax())
            extra = [f"{v:.6f}" for v in row.tolist()] if args.probs else []
            w.writerow([str(path), classes[c], c, f"{row[c].item():.6f}", *extra])
    print(f"{len(files)} images: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
