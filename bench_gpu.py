"""
The prepared check of a machine with one NVIDIA GPU: `python bench.py --gpu`. Every part of the
GPU path that a CPU cannot show, on random weights and synthetic data it makes itself (no
internet), sized to finish within 8 minutes on one H100 (not yet run on one); one markdown
table, printed and written beside --out (bench.json -> bench.md), each row against its target:

    CPU against CUDA on the same small run (float32, and bf16 where the card has it)
    a resumed CUDA run with dropout against an uninterrupted one
    eval.py on the CUDA run: no new feature or stage-1 cache entry
    the ridge on CUDA against the CPU, and its time and memory at 27,000 x 3,072 x 16,384
    one whole-cortex --recipe brainwavlm step at UTS01's size, an epoch computed from it, and
    stage 1 of a whole subject computed from its extraction and ridge rates
    the moussa2025 protocol's extraction: seconds of audio per second
    the tests marked cuda (pytest -m cuda)

Without a GPU (or with --quick) it runs the same code at small sizes on the CPU, so that the
check itself is tested (tests/test_bench.py); its figures then say nothing of a GPU.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA
import numpy as np
import torch

import bench_runs
import compare
import config
import data
import dist
import eval as ev
import objective
import preflight
import ridge
import synthetic
from features import PROTOCOLS, Protocol, stride_frames, window_features
from model import BrainModel, Extractor, add_adapters, build_backbone, make_head

ROOT = os.path.dirname(os.path.abspath(__file__))
# the sizes checked: the real ones on a GPU; small ones, with tiny, where the check is tested
FULL = dict(ridge=(27_000, 3_072, 16_384), voxels=81_126, batch=16, steps=5, audio=120.0,
            step_model="wavlm_base_plus", layer=9, protocol_model="hubert_base", protocol_layer=12)
QUICK = dict(ridge=(800, 96, 500), voxels=2_000, batch=2, steps=2, audio=14.0, step_model="tiny",
             layer=3, protocol_model="tiny", protocol_layer=4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device, fn):
    """fn's time (s) and the peak memory it adds on the device (GB; on a CPU, the resident set's
    high-water mark above its start, bench_runs.peak_mb)."""
    if device.type != "cuda":
        t = time.perf_counter()
        mb = bench_runs.peak_mb(fn)
        return time.perf_counter() - t, mb / 1024
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base, t = torch.cuda.memory_allocated(device), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30


def train_py(flags, cache_folder, log):
    """python train.py FLAGS in a process of its own, with the cache cache_folder."""
    env = dict(os.environ, BRAINTUNE_CACHE=cache_folder)
    r = bench_runs.run_measured([sys.executable, "train.py", *flags], log, env)
    if r["exit"]:
        raise RuntimeError(f"train.py {' '.join(flags)} failed: see {log}")


def small_run(ds, out, device, *extra):
    """train.py on the small synthetic dataset, on `device`, with a cache of its own (the features
    of another device must not be read back); returns the run folder."""
    train_py(["--data", ds, "--model", "tiny", "--tiny-pretrain", "0", "--batch-size", "8",
              "--lr", "1e-3", "--device", str(device), "--out", out, *extra], out + "-cache",
             out + ".log")
    return out


def max_r_diff(a, b):
    """The largest difference of any voxel's baseline, tuned or refit r between two runs."""
    ra, rb = (np.load(os.path.join(r, "voxel_r.npz")) for r in (a, b))
    return max(float(np.nanmax(np.abs(ra[k] - rb[k]))) for k in ra.files)


def check_runs(tmp, device):
    """CPU against the device (float32; bf16 where native), a resumed run with dropout against an
    uninterrupted one, and eval.py on the device's run adding no cache entry: [row]."""
    ds = synthetic.make_demo(os.path.join(tmp, "ds"), n_subjects=1, n_stories=5, n_voxels=90,
                             seconds=60.0)
    base = ["--epochs", "2", "--lora-dropout", "0"]
    cpu = small_run(ds, os.path.join(tmp, "cpu"), torch.device("cpu"), *base)
    fp32 = small_run(ds, os.path.join(tmp, "fp32"), device, *base, "--precision", "fp32")
    rows = [("CPU against the device, float32: max voxel r difference",
             max_r_diff(cpu, fp32), "<= 1e-3", max_r_diff(cpu, fp32) <= 1e-3)]
    if dist.uses_bf16(device):
        bf16 = small_run(ds, os.path.join(tmp, "bf16"), device, *base)
        rows.append(("CPU against the device, bf16 autocast: max voxel r difference",
                     max_r_diff(cpu, bf16), "<= 2e-2", max_r_diff(cpu, bf16) <= 2e-2))
    else:
        rows.append(("CPU against the device, bf16 autocast", "not native here", "-", True))
    drop = ["--lora-dropout", "0.1", "--backbone-dropout", "0.1", "--patience", "3"]
    whole = small_run(ds, os.path.join(tmp, "whole"), device, "--epochs", "2", *drop)
    cut = small_run(ds, os.path.join(tmp, "cut"), device, "--epochs", "1", *drop)
    train_py(["--resume", cut, "--epochs", "2"], cut + "-cache", cut + "-resumed.log")
    rows.append(("a resumed run with dropout against an uninterrupted one: max voxel r "
                 "difference", max_r_diff(whole, cut), "<= 1e-5", max_r_diff(whole, cut) <= 1e-5))
    kinds = ("features", "protocol", "stage1")

    def entries():
        root = os.environ["BRAINTUNE_CACHE"]
        return sum(len(os.listdir(os.path.join(root, k))) for k in kinds
                   if os.path.isdir(os.path.join(root, k)))
    os.environ["BRAINTUNE_CACHE"] = whole + "-cache"
    before = entries()
    run = ev.load_run(whole)
    d = run.subject(run.subjects[0])
    run.fit(run.pretrained, d)  # as the run fit them: from the cache
    run.fit(run.tuned, d)
    compare.significance(run, permutations=99)
    new = entries() - before
    rows.append((f"eval.py on the run (device {run.device}): new feature or stage-1 cache "
                 "entries", new, "0", new == 0))
    return rows


def check_ridge(device, sizes):
    """The ridge on the device against the CPU on the same problem; its time and peak memory,
    and its time at a whole subject's 81,126 voxels (the per-voxel part scaled): [row], seconds
    at 81,126 voxels."""
    n, p, v = sizes["ridge"]
    problem = bench_runs.ridge_problem(n, p, v)
    X, Y, alphas, groups = problem.X, problem.Y, problem.alphas, problem.groups
    cpu = ridge.fit_ridge(X, Y, alphas, groups)
    seconds, gb = peak_gb(device, lambda: ridge.fit_ridge(X.to(device), Y, alphas, groups))
    small, _ = peak_gb(device, lambda: ridge.fit_ridge(X.to(device), Y[:, :v // 4], alphas,
                                                       groups))
    fit = ridge.fit_ridge(X.to(device), Y, alphas, groups)
    same = (fit.lambdas == cpu.lambdas).float().mean().item()
    keep = fit.lambdas == cpu.lambdas
    W = (fit.W[:, keep] - cpu.W[:, keep]).abs().max() / cpu.W[:, keep].abs().max()
    whole = small + (seconds - small) * (sizes["voxels"] - v // 4) / (v - v // 4)
    return [(f"ridge {n} x {p} x {v} on the device against the CPU: the same lambda",
             f"{100 * same:.2f}% of voxels", ">= 99.9%", same >= 0.999),
            ("  its weights, where the lambda is the same: max relative difference",
             W.item(), "<= 1e-3", W.item() <= 1e-3),
            ("  its time and peak memory on the device", f"{seconds:.1f} s, {gb:.2f} GB", "-",
             True)], whole


def check_step(device, sizes):
    """One whole-cortex --recipe brainwavlm step at UTS01's size (wavlm_base_plus's architecture,
    random; 81,126 voxels through a bottleneck of 100; LoRA rank 4 on q k v; the correlation
    loss), against the pre-flight's estimate: [row], windows per second."""
    args = config.parse(["--recipe", "brainwavlm", "--data", "ds", "--batch-size",
                         str(sizes["batch"]), "--model", sizes["step_model"], "--layer",
                         str(sizes["layer"])])
    torch.manual_seed(0)
    with torch.device(device):
        backbone = build_backbone(args.model, args.backbone_dropout)
    ex = Extractor(args.model, backbone, sizes["layer"])
    add_adapters(backbone, sizes["layer"], args.lora_rank, args.lora_alpha, args.lora_dropout,
                 args.lora_targets)
    p = preflight.head_input(args)
    head = make_head(0.01 * torch.randn(p, sizes["voxels"], device=device), 100)
    net = BrainModel(ex, [head], torch.zeros(p, device=device), torch.ones(p, device=device), 4)
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4)
    wave = torch.randn(sizes["batch"], round(4 * data.TR * data.SR), device=device)
    y = torch.randn(sizes["batch"], sizes["voxels"], device=device)

    def step():
        with dist.autocast(device, args.precision):
            pred = net(wave)[0]
        objective.loss_fn(pred, y, "corr").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    seconds, gb = peak_gb(device, lambda: [step() for _ in range(sizes["steps"])])
    rate = sizes["batch"] * sizes["steps"] / seconds
    listing = preflight.Listing("UTS01", sizes["voxels"], dict(train=["s"]), {"s": 27_000}, {})
    need = sum(x.nbytes for x in preflight.stage_needs(args, [listing], device)["stage 2"])
    return [("brainwavlm whole-cortex step, batch " + str(sizes["batch"]),
             f"{seconds / sizes['steps']:.3f} s, {rate:.0f} windows/s", "-", True),
            ("  its peak memory against the pre-flight's estimate",
             f"{gb:.2f} GB, estimated {need / 2 ** 30:.2f} GB", "measured <= estimate + 20%",
             gb <= 1.2 * need / 2 ** 30),
            ("  an epoch of 27,000 windows, computed", f"{27_000 / rate / 60:.1f} min",
             "<= 2 min", 27_000 / rate <= 120)], rate


def check_extraction(device, sizes, ridge_whole):
    """Stage 1's extraction of brainwavlm's 8 s windows (windows per second) and, with the ridge
    at 81,126 voxels, a whole subject's stage 1; the moussa2025 protocol's extraction (16 s heard
    per 0.1 s stride, hubert_base's architecture): seconds of audio per second. [row]."""
    torch.manual_seed(0)
    with torch.device(device):
        wavlm, hubert = (build_backbone(sizes[k]) for k in ("step_model", "protocol_model"))
    wave = np.random.default_rng(0).standard_normal(round(sizes["audio"] * data.SR))
    n = int(sizes["audio"] / data.TR) - 4
    win = data.Windows({"s": wave.astype(np.float32)}, {"s": n}, ["s"], history=4, trim_start=0,
                       sound_start=-4 * data.TR)
    ex = Extractor(sizes["step_model"], wavlm.eval(), sizes["layer"])

    def windows():
        window_features(lambda w: ex.pooled(w, 4), win, None, device, batch_size=64)
    seconds, _ = peak_gb(device, windows)
    stage1 = 26_685 / (n / seconds) + ridge_whole
    protocol = Protocol("moussa2025", 5, **{k: PROTOCOLS["moussa2025"][k]
                                            for k in ("context", "stride", "delays")})
    frames = Extractor(sizes["protocol_model"], hubert.eval(), sizes["protocol_layer"])
    t, _ = peak_gb(device, lambda: stride_frames(frames.hidden, wave, frames.hop, protocol,
                                                 device, batch_size=64))
    return [("stage 1 of a whole subject (26,685 windows of 8 s; the ridge at 81,126 voxels), "
             "computed", f"{stage1 / 60:.1f} min ({n / seconds:.0f} windows/s)", "<= 2 min",
             stage1 <= 120),
            ("moussa2025 protocol's extraction (16 s per 0.1 s stride)",
             f"{sizes['audio'] / t:.1f} s of audio per s", "-", True)]


def check_marked_tests():
    """The tests marked cuda, in a process of their own: [row]."""
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                        "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or ["no output"])[-1]
    return [("the tests marked cuda (pytest -m cuda)", last, "all passed", p.returncode == 0)]


def table_path(out):
    """The markdown table's file beside the JSON `out`: bench.json -> bench.md."""
    return os.path.splitext(out)[0] + ".md"


def main(out, quick=False):
    """Every check on the first GPU (the CPU where there is none), the table printed and written
    beside `out` (table_path), the rows to `out` (JSON)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    sizes = QUICK if quick or device.type == "cpu" else FULL
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU: the CPU"
    tmp, cache_was = tempfile.mkdtemp(prefix="bench-gpu-"), os.environ.get("BRAINTUNE_CACHE")
    try:
        rows = check_runs(tmp, device)
        ridge_rows, ridge_whole = check_ridge(device, sizes)
        step_rows, _ = check_step(device, sizes)
        rows += ridge_rows + step_rows + check_extraction(device, sizes, ridge_whole)
        rows += check_marked_tests() if device.type == "cuda" else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.environ.pop("BRAINTUNE_CACHE", None)
        if cache_was is not None:
            os.environ["BRAINTUNE_CACHE"] = cache_was
    lines = [f"`python bench.py --gpu` on {name} (torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}{', scaled down' if sizes is QUICK else ''})", "",
             "| check | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {what} | {value:.2g} | {target} | {'pass' if ok else 'FAIL'} |"
              if isinstance(value, float) else
              f"| {what} | {value} | {target} | {'pass' if ok else 'FAIL'} |"
              for what, value, target, ok in rows]
    table = "\n".join(lines)
    with open(table_path(out), "x") as f:  # "x": new files, as bench.py checked
        f.write(table + "\n")
    with open(out, "x") as f:
        json.dump(dict(device=name, rows=[list(map(str, r)) for r in rows]), f, indent=1)
    print(table)
    return rows
