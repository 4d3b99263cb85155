"""`python -m mwn.bench`: time the real training steps, interleaved in one process.

Variants, each the trainer's own step function wrapped by `mwn.run.accel.make_step`, with the step
hyperparameters of the trainer's composed config (its defaults, or the overrides given):
    erm              plain training: forward, backward, SGD step
    mwn              MWN iteration, exact JVP meta-gradient, rollback=true
    mwn_no_rollback  the same with rollback=false
    finite_difference, fd_no_rollback  the mwn variants with meta_grad=finite_difference: the
                     dot products by central differences (Betty's darts approximation)
    double_backward  MWN iteration whose meta-gradient is autodiff through the unrolled step
                     (create_graph=True), as the original MWN code computes it; rollback=true
    mwn_adamw        the mwn variant with AdamW as the classifier's optimiser (its exact
                     meta-gradient: a diagonal in the lookahead's JVP)
    reweighter       the mwn variant through mwn.MetaReweighter: an nn.Module and torch.optim
                     optimisers, the state gathered and written back in place every call
    l2rw, focal, class_balanced  the paper's other baselines
The classifier is the CIFAR ResNet of --depth and --width, or the config's model when the
overrides name one (model=resnet18, model._target_=...).
Rounds visit the variants in rotating order so that machine drift hits all alike; the report is
the median milliseconds per iteration, its ratio to ERM, extra peak memory per iteration, and
the time to draw one augmented batch from the device-resident dataset.

With --runs K1,K2,... each variant is also timed as a vectorised group of K runs (the step of
hydra/launcher=vmap, mwn.run.group: K states, K different batches, one vmapped step), reported as
"VARIANT xK": ms per group iteration, ms per run, and runs per second over K single runs'.

With --profile, one MWN iteration is also cut into its stages (mwn.bench_stages), each timed in
interleaved rounds for jvp and finite_difference, with and without roll back: ms per stage and
its multiple of one forward of the training batch.

With --stream, drawing one augmented batch is also timed from a temporary folder of random JPEG
files of the --shape (--stream-images of them), held on the device against streamed from disk
by --stream-workers DataLoader workers (mwn.data.streaming): images per second each, and the
ratio of their times; --warmup batches untimed, then --iters batches back to back.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

from mwn.config import compose_config
from mwn.core.methods import METHODS
from mwn.core.models import ResNet, extract_state
from mwn.core.optim import adam_init
from mwn.core.step import StepHP, init_state
from mwn.data.batches import DeviceImages, Sampler
from mwn.data.streaming import FileImages, StreamedImages, probe_files
from mwn.run.accel import channels_last, make_step
from mwn.run.build import new_meta_net
from mwn.run.group import PER_RUN_HP, group_state, meta_shapes, stack, vectorised
from mwn.run.model import build_model, model_name
from mwn.seeds import Stream, step_generator

VARIANTS = (
    "erm",
    "mwn",
    "mwn_no_rollback",
    "finite_difference",
    "fd_no_rollback",
    "double_backward",
    "mwn_adamw",
    "reweighter",
    "l2rw",
    "focal",
    "class_balanced",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mwn.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default cpu)")
    p.add_argument("--fp16", action="store_true", help="float16 autocast + loss scaling (CUDA)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    p.add_argument(
        "--tf32", action="store_true", help="TF32 matrix products and convolutions (CUDA)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the step functions")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each step as a CUDA graph")
    p.add_argument("--channels-last", action="store_true", help="NHWC images and conv weights")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--meta-batch-size", type=int, default=100)
    p.add_argument("--shape", default="3,32,32", help="image C,H,W (default CIFAR's 3,32,32)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--depth", type=int, default=32, help="ResNet depth, 6n+2 (default 32)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--iters", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--runs",
        default="",
        help="K1,K2,...: also time each variant as a vectorised group of K runs (e.g. 1,4,16)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="also time drawing a batch from JPEG files streamed from disk (mwn.data.streaming)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time each stage of one MWN iteration (mwn.bench_stages); fp32 eager",
    )
    p.add_argument("--stream-images", type=int, default=2000, help="JPEGs written for --stream")
    p.add_argument("--stream-workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides for the step's hyperparameters, "
        "as for mwn.train (e.g. nesterov=true); default: the trainer's defaults",
    )
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; allowed: {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; allowed: cpu")
    if (args.fp16 or args.cuda_graphs) and args.device != "cuda":
        p.error("--fp16 and --cuda-graphs need --device cuda")
    if args.fp16 and args.bf16:
        p.error("--fp16 and --bf16: choose one")
    if args.tf32 and args.device != "cuda":
        p.error("--tf32 needs --device cuda")
    try:
        args.runs = [int(k) for k in args.runs.split(",") if k]
    except ValueError:
        p.error(f"--runs {args.runs}: allowed values are run counts, e.g. 1,4,16")
    if any(k < 1 for k in args.runs):
        p.error(f"--runs {args.runs}: allowed values are >= 1")
    if args.stream and not args.batch_size <= args.stream_images:
        p.error(f"--stream-images {args.stream_images}: allowed values are >= --batch-size")
    if args.profile and (args.fp16 or args.bf16 or args.compile or args.cuda_graphs):
        p.error("--profile times the fp32 eager stages: drop --fp16/--bf16/--compile/--cuda-graphs")
    if args.stream_workers < 0:
        p.error(f"--stream-workers {args.stream_workers}: allowed values are >= 0")
    if args.compile or args.cuda_graphs or args.channels_last:  # the wrapper runs eager, NCHW
        args.variants = ",".join(v for v in args.variants.split(",") if v != "reweighter")
    if (args.fp16 or args.bf16) and "double_backward" in args.variants.split(","):
        args.variants = ",".join(v for v in args.variants.split(",") if v != "double_backward")
    return args


def setup(args: argparse.Namespace) -> dict:
    """Models, a training state, fixed batches, a CIFAR-sized uint8 dataset on the device, and
    every variant's step function."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    c, h, w = (int(v) for v in args.shape.split(","))
    cfg = compose_config(args.overrides)
    if cfg.model._target_ is None:
        model = ResNet(args.classes, args.depth, args.width, in_channels=c).to(device)
    else:
        model = build_model(cfg.model, args.classes, (c, h, w)).to(device)
    meta_net = new_meta_net(cfg).to(device)
    params, buffers = extract_state(model)
    if args.channels_last:
        params = channels_last(params)
    state = init_state(params, buffers, extract_state(meta_net)[0], args.fp16, str(cfg.optimizer))
    state["class_weights"] = torch.ones(args.classes, device=device)  # class_balanced
    adamw_state = {**state, "momentum": adam_init(params)}  # the mwn_adamw variant's
    images = torch.randint(0, 256, (50_000, c, h, w), dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (50_000,))
    data = DeviceImages(
        images, labels, [0.5] * c, [0.25] * c, device, channels_last=args.channels_last
    )
    sampler = Sampler(len(data), args.batch_size, 0, Stream.TRAIN_BATCHES, "--batch-size")

    def draw(k: int, size: int):
        gen = step_generator(0, Stream.TRAIN_AUG, k, device)
        return data.batch(sampler.indices(k)[:size], 4, True, gen)

    hp = replace(StepHP.from_config(cfg), fp16=args.fp16, bf16=args.bf16)
    specs = {
        "erm": (METHODS["erm"].step, hp),
        "mwn": (METHODS["mwn"].step, replace(hp, rollback=True, meta_grad="jvp")),
        "mwn_no_rollback": (METHODS["mwn"].step, replace(hp, rollback=False, meta_grad="jvp")),
        "finite_difference": (
            METHODS["mwn"].step,
            replace(hp, rollback=True, meta_grad="finite_difference"),
        ),
        "fd_no_rollback": (
            METHODS["mwn"].step,
            replace(hp, rollback=False, meta_grad="finite_difference"),
        ),
        "double_backward": (
            METHODS["mwn"].step,
            replace(hp, rollback=True, meta_grad="double_backward"),
        ),
        "mwn_adamw": (
            METHODS["mwn"].step,
            replace(hp, rollback=True, meta_grad="jvp", optimizer="adamw", nesterov=False),
        ),
        "l2rw": (METHODS["l2rw"].step, hp),
        "focal": (METHODS["focal"].step, hp),
        "class_balanced": (METHODS["class_balanced"].step, hp),
    }
    lr, batch, meta_batch = 0.1, draw(0, args.batch_size), draw(1, args.meta_batch_size)
    chosen = [n for n in VARIANTS if n in args.variants.split(",")]
    calls = {  # name -> (step, its arguments)
        name: (
            make_step(
                specs[name][0], model, meta_net, specs[name][1], args.compile, args.cuda_graphs
            ),
            (adamw_state if name == "mwn_adamw" else state, batch, meta_batch, lr),
        )
        for name in chosen
        if name != "reweighter"
    }
    if "reweighter" in chosen:
        calls["reweighter"] = reweighter_call(
            model, meta_net, specs["mwn"][1], lr, batch, meta_batch
        )
    for k in args.runs:  # K runs (the same initial state, different batches) in one step
        batches = stack([draw(2 + i, args.batch_size) for i in range(k)])
        meta_batches = stack([draw(2 + k + i, args.meta_batch_size) for i in range(k)])
        for name in chosen:
            if name == "reweighter":  # one model, one loop: not vectorised
                continue
            fn, shp = specs[name]
            hps = [{f: getattr(shp, f) for f in PER_RUN_HP}] * k
            one = adamw_state if name == "mwn_adamw" else state
            group = group_state([one] * k, hps, meta_shapes(meta_net))
            step = make_step(vectorised(fn), model, meta_net, shp, args.compile, args.cuda_graphs)
            lrs = torch.full((k,), lr, device=device)
            calls[f"{name} x{k}"] = (step, (group, batches, meta_batches, lrs))
    name = (
        f"ResNet{args.depth} (width {args.width})"
        if cfg.model._target_ is None
        else model_name(cfg.model)
    )
    return {
        "model": name,
        "hp": {name: shp for name, (_, shp) in specs.items()},
        "models": (model, meta_net),
        "inputs": (state, batch, meta_batch, lr),
        "device": device,
        "calls": calls,
        "draw": draw,
    }


def reweighter_call(model, meta_net, hp: StepHP, lr: float, batch, meta_batch) -> tuple:
    """mwn.MetaReweighter's step on copies of the model and meta-net, with torch.optim's SGD and
    Adam set as `hp`: the same iteration as the mwn variant, through the stateful wrapper."""
    from mwn.api.reweighter import MetaReweighter

    model, meta_net = copy.deepcopy(model), copy.deepcopy(meta_net)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=hp.momentum,
        weight_decay=hp.weight_decay,
        nesterov=hp.nesterov,
    )
    meta_opt = torch.optim.Adam(
        meta_net.parameters(), lr=hp.meta_lr, weight_decay=hp.meta_weight_decay
    )
    amp = "fp16" if hp.fp16 else "bf16" if hp.bf16 else None
    rw = MetaReweighter(
        model, opt, meta_net, meta_opt, normalize_weights=hp.normalize_weights, amp=amp
    )
    return rw.step, (*batch, *meta_batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def time_variants(args: argparse.Namespace, env: dict) -> dict[str, list[float]]:
    """Milliseconds per call of each variant (and of drawing a batch), rounds interleaved."""
    names = list(env["calls"])
    times: dict[str, list[float]] = {n: [] for n in [*names, "data"]}
    for r in range(args.warmup + args.iters):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: drift hits all
        for name in [*order, "data"]:
            sync(env["device"])
            t0 = time.perf_counter()
            if name == "data":
                env["draw"](r, args.batch_size)
            else:
                step, call_args = env["calls"][name]
                step(*call_args)
            sync(env["device"])
            if r >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - t0))
    return times


def time_streaming(args: argparse.Namespace) -> dict:
    """Drawing one augmented training batch (padding 4, flips) from random JPEGs of --shape held
    on the device, and from the same files streamed by --stream-workers DataLoader workers
    (decoding read ahead along the sampler's batches): ms per batch (mean over --iters batches
    back to back, after --warmup), images per second, and the streamed time over the device one."""
    device = torch.device(args.device)
    c, h, w = (int(v) for v in args.shape.split(","))
    n, size = args.stream_images, args.batch_size
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mwn-bench-") as tmp:
        files = []
        for i in range(n):
            pixels = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=gen).numpy()
            files.append(Path(tmp) / f"{i:05d}.jpg")
            Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(files[-1], quality=90)
        channels, hw = probe_files(files, None)
        images = FileImages(files, None, channels, hw)
        labels = torch.randint(0, args.classes, (n,), generator=gen)
        mean, std = [0.5] * channels, [0.25] * channels
        on_device = DeviceImages(images.load(), labels, mean, std, device)
        streamed = StreamedImages(images, labels, mean, std, device, workers=args.stream_workers)
        sampler = Sampler(n, size, 0, Stream.TRAIN_BATCHES, "--batch-size")
        rounds = args.warmup + args.iters
        ms = {}
        with streamed:
            for name, data in (("device", on_device), ("streamed", streamed)):
                if data is streamed:  # the workers start now: no reading ahead while idle
                    streamed.plan(sampler.indices, 0, rounds)
                for k in range(rounds):
                    if k == args.warmup:
                        sync(device)
                        t0 = time.perf_counter()
                    gen_k = step_generator(0, Stream.TRAIN_AUG, k, device)
                    data.batch(sampler.indices(k), 4, True, gen_k)
                sync(device)
                ms[name] = 1000 * (time.perf_counter() - t0) / args.iters
            planned = streamed.hits
    return {
        "images": n,
        "image_shape": [channels, *hw],
        "batch_size": size,
        "workers": args.stream_workers,
        "batches": args.iters,
        "planned_batches_used": planned,
        "ms_per_batch": ms,
        "images_per_s": {k: 1000 * size / v for k, v in ms.items()},
        "streamed_over_device": ms["streamed"] / ms["device"],
    }


def peak_memory_mb(env: dict, variant: str) -> float:
    """Extra peak memory of one (warmed-up) iteration over what was allocated before it, in MB:
    CUDA from the allocator's peak; CPU from the profiler's allocation events, summed in time
    order (the peak of live bytes the iteration allocated)."""
    (step, args), device = env["calls"][variant], env["device"]
    step(*args)  # warm: caches, compilation, capture
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*args)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    env = setup(args)
    times = time_variants(args, env)
    med = {k: statistics.median(v) for k, v in times.items()}
    erm = med.get("erm")
    memory = {}
    if not args.no_memory and not args.cuda_graphs:  # a replayed graph allocates nothing
        memory = {v: peak_memory_mb(env, v) for v in env["calls"]}
    report = {
        "config": vars(args)
        | {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "model": env["model"],
        "step_hp": {k: asdict(v) for k, v in env["hp"].items() if k in env["calls"]},
        "ms": med,
        "ms_all": times,
        "ratio_to_erm": {k: med[k] / erm for k in env["calls"] if " x" not in k} if erm else {},
        "extra_peak_memory_mb": memory,
    }
    if "mwn" in med and "double_backward" in med:
        report["mwn_over_double_backward"] = med["mwn"] / med["double_backward"]
    for name in ("mwn_adamw", "reweighter"):
        if "mwn" in med and name in med:
            report[f"{name}_over_mwn"] = med[name] / med["mwn"]
    if args.runs:  # per run, and K runs at once over K single runs (runs per second)
        report["groups"] = {
            name: {
                "variant": name.split(" x")[0],
                "runs": int(name.split(" x")[1]),
                "ms_per_run": med[name] / int(name.split(" x")[1]),
                "speedup_per_run": med[name.split(" x")[0]] * int(name.split(" x")[1]) / med[name],
            }
            for name in env["calls"]
            if " x" in name
        }
    for a, b in (("mwn", "finite_difference"), ("mwn_no_rollback", "fd_no_rollback")):
        if a in med and b in med:
            report[f"{a}_over_{b}"] = med[a] / med[b]
    if args.profile:
        from mwn.bench_stages import profile

        names = ("mwn", "mwn_no_rollback", "finite_difference", "fd_no_rollback")
        report["profile"] = profile(
            *env["models"],
            *env["inputs"],
            {k: env["hp"][k] for k in names},
            args.iters,
            args.warmup,
            lambda: sync(env["device"]),
        )
    if args.stream:
        report["stream"] = time_streaming(args)
    if memory.get("erm"):
        report["memory_ratio_to_erm"] = {k: v / memory["erm"] for k, v in memory.items()}
    print_report(args, report)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(args: argparse.Namespace, report: dict) -> None:
    mode = [
        m
        for m, on in (
            ("fp16", args.fp16),
            ("bf16", args.bf16),
            ("tf32", args.tf32),
            ("compile", args.compile),
            ("cuda-graphs", args.cuda_graphs),
            ("channels-last", args.channels_last),
        )
        if on
    ]
    print(
        f"{report['model']}, batch {args.batch_size}, meta batch "
        f"{args.meta_batch_size}, {args.shape} input, {args.device} "
        f"{'+'.join(mode) or 'fp32 eager'}; median of {args.iters} interleaved rounds"
    )
    print(f"{'variant':18s} {'ms/iter':>9s} {'x ERM':>7s} {'extra peak MB':>14s} {'x ERM':>7s}")  # noqa: E501
    for k, ms in report["ms"].items():
        if k == "data" or " x" in k:
            continue
        r = report["ratio_to_erm"].get(k, float("nan"))
        m = report["extra_peak_memory_mb"].get(k, float("nan"))
        mr = report.get("memory_ratio_to_erm", {}).get(k, float("nan"))
        print(f"{k:18s} {ms:9.2f} {r:7.2f} {m:14.1f} {mr:7.2f}")
    print(f"{'data (one batch)':18s} {report['ms']['data']:9.3f}")
    if report.get("groups"):
        print(f"{'vectorised group':18s} {'ms/iter':>9s} {'ms/run':>9s} {'runs/s x single':>16s}")
        for name, g in report["groups"].items():
            print(
                f"{name:18s} {report['ms'][name]:9.2f} {g['ms_per_run']:9.2f} "
                f"{g['speedup_per_run']:16.2f}"
            )
    if "mwn_over_double_backward" in report:
        print(f"mwn / double_backward: {report['mwn_over_double_backward']:.2f}")
    for a, b in (("mwn", "finite_difference"), ("mwn_no_rollback", "fd_no_rollback")):
        if f"{a}_over_{b}" in report:
            print(f"{a} / {b}: {report[f'{a}_over_{b}']:.3f}")
    if "profile" in report:
        from mwn.bench_stages import print_profile

        print_profile(report["profile"], args.iters)
    for name in ("mwn_adamw", "reweighter"):
        if f"{name}_over_mwn" in report:
            print(f"{name} / mwn: {report[f'{name}_over_mwn']:.3f}")
    if "stream" in report:
        st = report["stream"]
        print(
            f"one augmented batch of {st['batch_size']} from {st['images']} JPEGs "
            f"({'x'.join(map(str, st['image_shape']))}), mean of {st['batches']} batches:"
        )
        for name, what in (("device", "on the device"), ("streamed", "streamed from disk")):
            n = st["workers"]
            workers = f", {n} worker{'s' * (n != 1)}" if name == "streamed" else ""
            print(
                f"  {what + workers:30s} {st['ms_per_batch'][name]:9.3f} ms "
                f"{st['images_per_s'][name]:12.0f} images/s"
            )
        print(f"  streamed / device time: {st['streamed_over_device']:.1f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
