"""
The figures of a finished run (eval.py --plot), PNGs in its folder: each subject's refit r against
baseline r and the change's histogram, the training curves, LoRA's relative weight change per layer,
and the figures of the analyses already in analyses.json (the layer profile, the efficiency curve);
and a sweep's changes with their intervals (sweep.py).

    paths = plot(eval.load_run("runs/RUN"))
    plot_sweep(compare.sweep_statistics(seeds, settings), "sweeps/NAME/sweep.png")
"""
import json
import os

import numpy as np

import data
import guard
import voxels
import lora
from cache import read_json


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, paths):
    """fig written to path as a PNG, closed, and path added to paths."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    paths.append(path)


def plot(run):
    """Every figure of the run (an eval.Run); returns their paths."""
    plt, folder, args = pyplot(), run.folder, run.args
    npz = guard.load_array(os.path.join(folder, "voxel_r.npz"), None)
    multi = len(run.subjects) > 1  # keys "<subject>.baseline_r" ..., one scatter and histogram each
    paths = []
    for subj in (data.find_subject(args.data, s) for s in run.subjects):
        r = {k.split(".")[-1]: npz[k] for k in npz if not multi or k.startswith(subj + ".")}
        if "refit_r" not in r:
            raise ValueError(f"{folder} is a stage-1 run (--epochs 0): there is no tuned model to "
                             "plot")
        rois = voxels.roi_sets(data.roi_path(args.data, subj), len(r["baseline_r"]))
        plot_voxels(subj, r, rois, folder, paths, f"_{subj}" if multi else "")
    metrics = [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl"))]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [m["epoch"] for m in metrics]
    a1.plot(epochs, [m["train_loss"] for m in metrics], "o-")
    a1.set(xlabel="epoch", ylabel="training loss", title="training")
    a2.plot(epochs, [m["val_r"] for m in metrics], "o-")
    a2.set(xlabel="epoch", ylabel="validation r (trained voxels)", title="validation")
    save(fig, os.path.join(folder, "curves.png"), paths)
    if args.lora_rank > 0:
        plot_weight_change(lora.delta_norms(run.tuned.backbone), folder, paths)
    saved = os.path.join(folder, "analyses.json")
    analyses = read_json(saved) if os.path.exists(saved) else {}
    if analyses.get("layers"):
        plot_layers(analyses["layers"], folder, paths)
    if analyses.get("efficiency"):
        plot_efficiency(analyses["efficiency"], folder, paths)
    return paths


def plot_voxels(subj, r, rois, folder, paths, tag=""):
    """One subject's per-voxel figures: refit r against baseline r, by ROI; the change's
    histogram; their names end in tag."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(r["baseline_r"], r["refit_r"], s=4, c="lightgray", label="other")
    for name, idx in rois.items():
        ax.scatter(r["baseline_r"][idx], r["refit_r"][idx], s=4, label=name)
    both = [r["baseline_r"], r["refit_r"]]
    lim = [np.nanmin(both), np.nanmax(both)]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlabel="baseline r (pretrained)", ylabel="tuned r (ridge refit)",
           title=f"{subj}: test-story r per voxel")
    ax.legend(markerscale=3)
    save(fig, os.path.join(folder, f"scatter{tag}.png"), paths)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist((r["refit_r"] - r["baseline_r"])[np.isfinite(r["refit_r"])], bins=40)
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel="tuned r - baseline r", ylabel="voxels", title=f"{subj}: per-voxel change")
    save(fig, os.path.join(folder, f"change_hist{tag}.png"), paths)


def plot_weight_change(norms, folder, paths):
    """||scaling B A|| / ||W|| per layer, a line per projection (lora.delta_norms)."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for p in "qkvo":
        pts = [(int(k.split(".")[3]) + 1, v) for k, v in norms.items() if k.endswith("." + p)]
        if pts:
            ax.plot(*zip(*pts), "o-", label=p)
    ax.set(xlabel="transformer layer", ylabel="||scaling B A|| / ||W||",
           title="relative weight change")
    ax.legend()
    save(fig, os.path.join(folder, "weight_change.png"), paths)


def plot_layers(layers, folder, paths):
    """eval.py --layers: mean r against layer, a panel per voxel set."""
    names = list(next(iter(layers.values()))["pretrained"])
    fig, axes = pyplot().subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, k in zip(axes[0], names):
        for model in ("pretrained", "tuned"):
            pts = sorted((int(x), row[model][k]) for x, row in layers.items() if model in row)
            if pts:
                ax.plot(*zip(*pts), "o-", label=model)
        ax.set(xlabel="transformer layer", ylabel="mean test r", title=k)
        ax.legend()
    save(fig, os.path.join(folder, "layers.png"), paths)


def plot_efficiency(eff, folder, paths):
    """eval.py --efficiency: mean test r against hours of training fMRI, a panel per voxel set."""
    names = list(eff["curve"][0]["pretrained"])
    fig, axes = pyplot().subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, k in zip(axes[0], names):
        for model in ("pretrained", "tuned"):
            pts = [(p["hours"], p[model][k]) for p in eff["curve"] if model in p]
            if pts:
                ax.plot(*zip(*pts), "o-", label=model)
        ax.set(xscale="log", xlabel="hours of training fMRI", ylabel="mean test r", title=k)
        ax.legend()
    save(fig, os.path.join(folder, "efficiency.png"), paths)


def plot_sweep(stats, path):
    """A sweep's figure (sweep.py), per voxel set: each setting's change in mean r with its 95%
    interval over the seeds and the test story's blocks, and each seed's change (grey dots)."""
    plt, sets_ = pyplot(), stats["sets"]
    fig, axes = plt.subplots(1, len(sets_), figsize=(1 + 3.2 * len(sets_), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], sets_.items()):
        x = np.arange(len(rows))
        mean = np.array([row["change"] for row in rows.values()])
        ci = np.array([row["change_ci"] for row in rows.values()]).T  # (2, settings)
        ax.errorbar(x, mean, yerr=np.abs(ci - mean), fmt="o", capsize=4)
        for i, row in enumerate(rows.values()):
            ax.scatter(np.full(len(row["seeds"]), i + 0.15), list(row["seeds"].values()), s=10,
                       c="gray")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, list(rows), rotation=30, ha="right")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_title(name)
    axes[0][0].set_ylabel("change in mean r (refit - baseline)")
    save(fig, path, [])
    return path
