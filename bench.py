"""
braintune's speed and memory on synthetic tensors of realistic sizes (no data or weights needed).
Prints a table and writes bench.json. Every time is the median of several repetitions after a
warm-up; every target is a ratio measured in the same run.

    python bench.py            # the full sizes (about 30 minutes on 2 CPU cores)
    python bench.py --quick    # scaled down, under a minute
    python bench.py --only quickstart,fullscale,downstream   # whole commands (bench_runs.py)
    python bench.py --gpu      # the prepared check of a machine with one GPU (bench_gpu.py)
"""
import functools
import json
import os
import platform
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet
import numpy as np
import torch
import torch.nn as nn

import bench_gpu
import bench_runs
import data
import guard
import lora
import ridge
from bench_runs import peak_mb, ridge_problem, timeit
from features import window_features
from model import (BrainModel, Extractor, build_backbone, hidden, keep_freed_memory,
                   layer_of, make_head)


def ridge_flops(n, p, v, n_alphas=10, folds=5):
    """FLOPs of fit_ridge: Gram matrices, eigendecompositions (~9 p^3 each), then per voxel X'Y,
    each fold's V'X'Y and Xc'Y, every lambda's covariance and variance, and the refit."""
    n_te = n / folds
    setup = (
        4 * n * p * p + (folds + 1) * 9 * p**3 + folds * 2 * n_te * p * (p + (p if n_te > p else 0))
    )
    per_voxel = (2 * n * p
                 + folds * (2 * p * p + 2 * min(n_te, p) * p * (1 + n_alphas) + 2 * n_alphas * p)
                 + 4 * p * p)
    return setup + per_voxel * v


def bench_ridge(n, p, v, reps, peer=True):
    problem = ridge_problem(n, p, v)
    X, Y, alphas, groups = problem.X, problem.Y, problem.alphas, problem.groups
    out = {"n": n, "p": p, "v": v,
           "seconds": timeit(lambda: ridge.fit_ridge(X, Y, alphas, groups), reps)}
    out["peak_mb"] = peak_mb(lambda: ridge.fit_ridge(X, Y, alphas, groups))
    out["gflops"] = ridge_flops(n, p, v) / out["seconds"] / 1e9
    with torch.profiler.profile() as prof:
        solved = ridge.fit_ridge(X, Y, alphas, groups)
        W, best = solved.W, solved.lambdas
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    dec = sum(t for k, t in ops.items() if "eigh" in k or "svd" in k)
    prod = sum(t for k, t in ops.items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
    out["share"] = {"decompositions": dec / total, "products": prod / total,
                    "scoring and rest": 1 - (dec + prod) / total}
    if not peer:
        return out
    try:
        from himalaya.backend import set_backend
        from himalaya.ridge import solve_ridge_cv_svd
        from himalaya.scoring import correlation_score
        set_backend("torch", on_error="raise")
        cv = [(np.flatnonzero(groups != k), np.flatnonzero(groups == k)) for k in np.unique(groups)]
        run = functools.partial(solve_ridge_cv_svd, X, Y, alphas=alphas, cv=cv,
                                score_func=correlation_score, n_alphas_batch=len(alphas),
                                n_targets_batch=v, n_targets_batch_refit=v)
        last = []
        out["himalaya_seconds"] = timeit(lambda: last.append(run()), max(1, reps - 1), warmup=0)
        ba, coef, _ = last[-1]
        ba, coef = torch.as_tensor(ba).float(), torch.as_tensor(coef).float()
        same = torch.isclose(ba, best.float())
        out["same_lambda"] = same.float().mean().item()
        out["max_rel_W_diff"] = (
            (W[:, same] - coef[:, same]).abs().max() / coef[:, same].abs().max()
        ).item()
        out["ratio_to_himalaya"] = out["seconds"] / out["himalaya_seconds"]
    except ImportError:
        out["himalaya"] = "not installed (pip install himalaya)"
    return out


def matmul_gflops(size, reps):
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / timeit(lambda: a @ b, reps) / 1e9


def backbone(name, dropout=None):
    """The architecture with random weights (no download), as train.py builds it."""
    torch.manual_seed(0)
    return build_backbone(name, dropout)


def forward_flops(model, wave):
    """FLOPs of one forward, counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.extract_features(wave)
    return fc.get_total_flops()


def mask_seconds(model, wave, layer, reps):
    """Seconds to draw one training forward's dropout masks as torch does on the CPU (a Bernoulli
    draw per element): each active nn.Dropout's output and each layer's attention probabilities
    (batch, heads, frames, frames), whose dropout happens inside scaled_dot_product_attention."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((o.shape, m.p)))
             for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    with torch.inference_mode():
        frames = hidden(model.eval(), wave, layer).shape[1]
    for h in hooks:
        h.remove()
    for att in (m.attention for m in model.encoder.transformer.layers[:layer]):
        if att.dropout > 0:
            shapes.append(((len(wave), att.num_heads, frames, frames), att.dropout))
    if not shapes:
        return 0.0
    return timeit(lambda: [torch.empty(shape).bernoulli_(1 - p) for shape, p in shapes], reps)


def bench_step(name, batch, history, rank, reps, *, n_vox=1000, step_only=False, subjects=1,
               dropout=None):
    """One stage-2 training step (forward, backward, AdamW) over one no-grad forward; with several
    subjects, a head each on the same shared windows (the mean of their losses, as train.py)."""
    model = backbone(name, dropout)
    L = len(model.encoder.transformer.layers)
    wave = torch.randn(batch, round(history * data.TR * data.SR))
    lora.add_lora(model, rank, 2.0 * max(rank, 1), 0.0, "qkvo")
    dim = model.encoder.feature_projection.projection.out_features
    heads = [nn.Linear(history * dim, n_vox) for _ in range(subjects)]
    p = history * dim
    net = BrainModel(Extractor(name, model, L), heads, torch.zeros(p), torch.ones(p), history)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    y = torch.randn(batch, n_vox)

    def step():
        net.train()
        loss = torch.stack([nn.functional.mse_loss(pred, y) for pred in net(wave)]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        net.eval()
        with torch.inference_mode():
            net(wave)
    if step_only:
        return {"model": name, "batch": batch, "subjects": subjects, "step_s": timeit(step, reps)}
    t_fwd, t_step = timeit(forward, reps), timeit(step, reps)
    return {"model": name, "batch": batch, "rank": rank, "dropout": dropout, "forward_s": t_fwd,
            "step_s": t_step, "step_over_forward": t_step / t_fwd, "peak_mb": peak_mb(step),
            "forward_gflops": forward_flops(model, wave) / t_fwd / 1e9,
            "masks_s": mask_seconds(model, wave, L, reps)}


def bench_extract(name, n_windows, history, batch, reps):
    """Stage-1 feature extraction (slicing, pooling, z-scoring) against the bare forward."""
    model = backbone(name).eval()
    L = layer_of(None, len(model.encoder.transformer.layers))
    seconds = n_windows * data.TR + history * data.TR
    wave = torch.randn(round(seconds * data.SR))
    rows = n_windows
    win = data.Windows({"s": wave.numpy()}, {"s": rows}, ["s"], history=history, trim_start=0,
                       sound_start=-history * data.TR)
    ex = Extractor(name, model, L)
    waves = torch.stack([win[i][0] for i in range(len(win))])

    def full():
        pooled = functools.partial(ex.pooled, history=history)
        window_features(pooled, win, None, torch.device("cpu"), batch_size=batch)

    def bare():
        with torch.inference_mode():
            for i in range(0, len(waves), batch):
                model.extract_features(waves[i:i + batch], num_layers=L)
    t_full = timeit(full, reps)
    t_bare = timeit(bare, reps)
    return {"model": name, "windows": n_windows,
            "audio_s_per_s": n_windows * history * data.TR / t_full,
            "overhead": t_full / t_bare - 1}


def bench_head(n_vox, p, bottleneck, batch=8):
    """Peak memory of a training step (forward, backward, AdamW) of the head alone, whole cortex."""
    head = make_head(torch.randn(p, n_vox) * 0.01, bottleneck)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    x, y = torch.randn(batch, p), torch.randn(batch, n_vox)

    def step():
        nn.functional.mse_loss(head(x), y).backward()
        opt.step()
    params = sum(q.numel() for q in head.parameters()) * 4 / 2 ** 20
    return {"voxels": n_vox, "p": p, "bottleneck": bottleneck, "params_mb": params,
            "peak_mb": peak_mb(step)}


def bench_stats(v, rows=291, block=10, sets=4):
    """The change's bootstrap interval (1,000 resamples, `sets` voxel sets) and every voxel's block-
    permutation p (1,000 permutations) on a test story of `rows` TRs, at v voxels."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(rows, v, generator=g)
    a, b = y + 2 * torch.randn(rows, v, generator=g), y + torch.randn(rows, v, generator=g)
    sets_ = {f"set{i}": np.arange(i, v, sets) for i in range(sets)}

    def sums(p):  # by voxel batches, as stage 1
        parts = [ridge.block_sums(p[:, j:j + 16384], y[:, j:j + 16384], [rows], block)
                 for j in range(0, v, 16384)]
        return ridge.BlockSums(torch.cat([b.sums for b in parts], -1), parts[0].rows)

    def boot():
        return ridge.change_ci(sums(a), sums(b), sets_)

    def perm():
        return [ridge.permutation_p(a[:, j:j + 16384], y[:, j:j + 16384], block)
                for j in range(0, v, 16384)]
    return {"voxels": v, "rows": rows, "bootstrap_s": timeit(boot, 1, 0),
            "bootstrap_peak_mb": peak_mb(boot), "permutation_s": timeit(perm, 1, 0),
            "permutation_peak_mb": peak_mb(perm)}


def main():
    ap = guard.Parser(description="braintune speed and memory benchmark")
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes, under a minute")
    ap.add_argument("--out", default="bench.json", help="where to write the numbers (a new file)")
    ap.add_argument("--only", default="", help="comma-separated parts to run (default all but "
                    "quickstart, fullscale and downstream): ridge, step, subjects, extract, head, "
                    "scaling, stats, quickstart, fullscale, downstream")
    ap.add_argument("--gpu", action="store_true", help="the prepared check of a machine with one "
                    "NVIDIA GPU (bench_gpu.py): a markdown table, at most 8 minutes")
    a = ap.parse_args()
    guard.new_path(a.out, "--out")  # never an earlier file overwritten
    if a.gpu:
        guard.new_path(bench_gpu.table_path(a.out), "--out")
        return bench_gpu.main(a.out, quick=a.quick)
    parts = ("ridge", "step", "subjects", "extract", "head", "scaling", "stats", "quickstart",
             "fullscale", "downstream")
    unknown = [x for x in a.only.split(",") if a.only and x not in parts]
    if unknown:
        sys.exit(f"error: --only {a.only}: unknown part {unknown[0]!r}; choose from "
                 f"{', '.join(parts)}")
    wanted = set(a.only.split(",") if a.only else parts[:-3])  # whole commands: asked for
    q = a.quick
    reps = 2 if q else 3
    keep_freed_memory()  # as train.py runs on a CPU: every part here runs there
    machine = {"cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cuda": torch.cuda.is_available(), "quick": q}
    res = {"machine": machine}
    res["matmul_gflops"] = matmul_gflops(1024 if q else 4096, reps)
    model = "tiny" if q else "wavlm_base"
    if "ridge" in wanted:
        res["ridge"] = bench_ridge(*((800, 400, 2000) if q else (4000, 2000, 10000)), reps)
    if "step" in wanted:
        res["step_lora"] = bench_step(model, 2 if q else 8, 6, 8, reps)
        res["step_lora_nodrop"] = bench_step(model, 2 if q else 8, 6, 8, reps, dropout=0.0)
        res["step_full"] = bench_step(model, 2 if q else 8, 6, 0, reps)
    if "subjects" in wanted:  # a window heard by k subjects is forwarded once: k heads on it
        res["step_subjects"] = [bench_step(model, 2 if q else 8, 6, 8, reps,
                                           n_vox=2000 if q else 10000, step_only=True, subjects=k)
                                for k in (1, 2, 3)]
    if "extract" in wanted:
        res["extract"] = bench_extract(model, 16 if q else 32, 6, 8, reps)
    if "head" in wanted:
        res["head"] = [bench_head(2000 if q else 81126, 384 if q else 4608, k) for k in (0, 256)]
    if "scaling" in wanted:
        res["scaling_ridge_v"] = [bench_ridge(1000, 500, v, 1, peer=False)
                                  for v in ((2000, 4000) if q else (10000, 20000, 40000, 80000))]
        res["scaling_ridge_n"] = [bench_ridge(n, 500, 2000 if q else 10000, 1, peer=False)
                                  for n in ((500, 1000) if q else (2000, 4000, 8000))]
        res["scaling_step"] = [bench_step(model, b, 6, 8, 1, step_only=True)
                               for b in ((1, 2) if q else (1, 2, 4, 8))]
    if "stats" in wanted:
        res["stats"] = bench_stats(2000 if q else 81126)
    if "quickstart" in wanted:  # the README's first command, cold and warm
        res["quickstart"] = bench_runs.bench_quickstart(q)
    if "fullscale" in wanted:  # about an hour, and 45 GB of disk, at the published size
        res["fullscale"] = bench_runs.bench_fullscale(q)
    if "downstream" in wanted:  # 33 min here (docs/speed.md), 3.3 GB of disk
        res["downstream"] = bench_runs.bench_downstream(q)
    with open(a.out, "x") as f:  # "x": not even a file made since the check
        json.dump(res, f, indent=1)
    print(format_report(res))


def format_report(res):
    """bench.json's numbers as lines of text, each part against its target."""
    mm = res["matmul_gflops"]
    lines = [f"machine: {res['machine']}", f"fp32 matmul: {mm:.0f} GFLOP/s"]
    if "ridge" in res:
        r = res["ridge"]
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["share"].items())
        lines.append(f"ridge n={r['n']} p={r['p']} v={r['v']}: {r['seconds']:.2f} s, "
                     f"{r['peak_mb']:.0f} MB, {r['gflops']:.0f} GFLOP/s "
                     f"({100 * r['gflops'] / mm:.0f}% of matmul); time in {shares}")
        if "himalaya_seconds" in r:
            lines.append(f"  himalaya {r['himalaya_seconds']:.2f} s: ratio "
                         f"{r['ratio_to_himalaya']:.2f} (target <= 0.5), same lambda "
                         f"{100 * r['same_lambda']:.2f}% (>= 99.9%), max rel W diff "
                         f"{r['max_rel_W_diff']:.1e}")
    for k in ("step_lora", "step_lora_nodrop", "step_full"):
        if k in res:
            s = res[k]
            drop = "the bundle's dropout" if s["dropout"] is None else f"dropout {s['dropout']}"
            masks = f"; drawing its dropout masks alone {s['masks_s']:.2f} s" * bool(s["masks_s"])
            lines.append(f"{k} {s['model']} batch {s['batch']}, {drop}: step {s['step_s']:.2f} s / "
                         f"forward {s['forward_s']:.2f} s = {s['step_over_forward']:.2f} (target "
                         f"<= 2.2), peak {s['peak_mb']:.0f} MB; forward "
                         f"{s['forward_gflops']:.0f} GFLOP/s "
                         f"({100 * s['forward_gflops'] / mm:.0f}% of matmul, target >= 60%){masks}")
    if "extract" in res:
        e = res["extract"]
        lines.append(f"extraction {e['model']}: {e['audio_s_per_s']:.1f} s of audio per s, "
                     f"overhead {100 * e['overhead']:+.1f}% (target <= 5%)")
    for x in res.get("step_subjects", []):
        ratio = x["step_s"] / res["step_subjects"][0]["step_s"]
        lines.append(f"step with {x['subjects']} subject(s), shared windows, batch {x['batch']}: "
                     f"{x['step_s']:.3f} s ({ratio:.2f} x one subject)")
    for h in res.get("head", []):
        lines.append(f"head step, {h['voxels']} voxels, p {h['p']}, bottleneck {h['bottleneck']}: "
                     f"peak {h['peak_mb']:.0f} MB (parameters {h['params_mb']:.0f} MB)")
    for key in ("scaling_ridge_v", "scaling_ridge_n"):
        lines += [f"{key}: n={x['n']} p={x['p']} v={x['v']}: {x['seconds']:.2f} s, peak "
                  f"{x['peak_mb']:.0f} MB (W alone: {4 * x['p'] * x['v'] / 2 ** 20:.0f} MB)"
                  for x in res.get(key, [])]
    lines += [f"scaling_step batch {x['batch']}: {x['step_s']:.3f} s"
              for x in res.get("scaling_step", [])]
    if "stats" in res:
        s = res["stats"]
        lines.append(f"statistics, {s['voxels']} voxels, {s['rows']} test TRs: bootstrap interval "
                     f"{s['bootstrap_s']:.1f} s ({s['bootstrap_peak_mb']:.0f} MB), permutation p "
                     f"{s['permutation_s']:.1f} s ({s['permutation_peak_mb']:.0f} MB)")
    if "fullscale" in res:
        f = res["fullscale"]
        lines.append(f"fullscale dataset {f['dataset']}")
        lines += [f"fullscale {k}: {v['seconds']:.0f} s, peak private {v['private_gb']:.2f} GB, "
                  f"peak resident {v['resident_gb']:.2f} GB, cache {v['cache_gb']:.1f} GB"
                  for k, v in f.items() if k != "dataset"]
    for k in ("cold", "warm") if "quickstart" in res else ():
        r = res["quickstart"][k]
        lines.append(f"quick start ({res['quickstart']['command']}), {k} cache: "
                     f"{r['seconds']:.0f} s, peak private {r['private_gb']:.2f} GB")
    for k, d in res.get("downstream", {}).items():
        if k != "folder":
            lines.append(f"downstream speechcommands, {d['model']}, {d['clips']} clips x 2 "
                         f"backbones, {d['layers']} layer(s): {d['seconds']:.0f} s, "
                         f"{d['clips_per_s']:.1f} clips/s, peak private {d['private_gb']:.2f} GB "
                         "(target <= 4 GB)")
    return "\n".join(lines)


if __name__ == "__main__":
    guard.main_guard(main)
