"""
The papers' analyses of a finished run: each a flag, each a small table, each merged into
RUN/analyses.json (other keys are kept). One command loads the run once (config.load_run) and
hands it to every analysis it asks for.

    python eval.py RUN                      # the results table again, with noise-normalised r
    python eval.py RUN --subject S02        # cross-subject transfer (BrainWavLM)
    python eval.py RUN --probe semantic     # word meaning from features (BrainWavLM; probes.py)
    python eval.py RUN --probe phones       # phone identity from features (Moussa et al.; probes.py)
    python eval.py RUN --lowlevel           # reliance on low-level features (Moussa et al.; probes.py)
    python eval.py RUN --layers [2,5,9]     # the encoding r of each layer, pretrained and tuned
    python eval.py RUN --significance       # each voxel's r against zero (block permutation, FDR)
    python eval.py RUN --seeds RUN2 RUN3 [--vs RUN4 RUN5]   # stability across runs
    python eval.py RUN --plot               # figures in RUN
    python eval.py RUN --export tuned.pt    # merged plain torchaudio state dict
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

import cache
import config
import data
import lora
import probes
import ridge
from cache import save_atomic
from model import feature_key, pool_frames, pooled, window_features


def results(run):
    """{subject: {set: row}} from results.json, one subject or several."""
    res = json.load(open(os.path.join(run, "results.json")))
    return {k: v["test"] for k, v in res["subjects"].items()} if "subjects" in res else {res.get("subject", "-"): res["test"]}


def show(run):
    return ridge.format_table(results(run), json.load(open(os.path.join(run, "results.json"))).get("protocol"))


def cross_subject(run, subject, loaded=None):
    """The backbone tuned on the run's subject(s), ridge refit on another subject: test r against
    the pretrained backbone on that subject (BrainWavLM's transfer test)."""
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
    if tuned is None:
        raise ValueError(f"{run} has no tuned backbone (adapter.pt); it was a stage-1 run")
    d = config.load_subject(args, subject)
    if d.name in [data.find_subject(args.data, s) for s in args.subjects]:
        print(f"note: {d.name} was tuned on in {run}; this is not transfer to a new subject")
    base, new = config.fit(args, layer, pre, None, d), config.fit(args, layer, tuned, lw, d)
    res = {"baseline_r": base[4].numpy(), "refit_r": new[4].numpy()}
    out = ridge.summarize(res, ridge.sets(d, base[3]), d.ceiling, {"baseline": base[5], "refit": new[5]})
    cache.merge_analyses(run, f"transfer_{d.name}", dict(out, protocol=config.protocol(args)))
    return ridge.format_table({d.name: out}, config.protocol(args))


def parse_layers(text, depth, model):
    """--layers: 'all' or comma-separated 1-based layers within the model."""
    try:
        layers = list(range(1, depth + 1)) if text == "all" else [int(x) for x in text.split(",")]
    except ValueError:
        layers = []
    if not layers or not all(1 <= x <= depth for x in layers):
        raise ValueError(f"--layers {text}: expected 'all' or layers from 1..{depth} of {model}, comma-separated")
    return sorted(set(layers))


def profile(run, text="all", loaded=None):
    """The layer-wise encoding profile: for each layer, its features pooled into the run's TR bins,
    ridge refit on the run's training stories (stage 1's folds, lambdas and z-scoring), the test r of
    each voxel set (chosen by stage-1 cv r); pretrained, and tuned on layers 1..L, those that were
    tuned (above L the tuned model's weights are the pretrained ones). One forward per window and backbone
    yields every layer, each cached, then loaded one at a time."""
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
    layers = parse_layers(text, len(pre.encoder.transformer.layers), args.model)
    d = config.load_subject(args, args.subject)
    sets_ = ridge.sets(d, config.stage1_cv(run))
    out, cpu = {str(x): {} for x in layers}, torch.device("cpu")
    for name, bb in (("pretrained", pre), ("tuned", tuned)):
        chosen = [x for x in layers if name == "pretrained" or x <= layer] if bb is not None else []
        keys = [feature_key(args.model, bb, x, None, args.normalize) for x in chosen]

        def every(w, bb=bb, chosen=chosen):  # (batch, samples) -> [(batch, history * dim)], one per layer
            w = torch.nn.functional.layer_norm(w, w.shape[-1:]) if args.normalize else w
            hs = bb.extract_features(w, num_layers=max(chosen))[0]
            return [pool_frames(hs[x - 1], args.history).flatten(1) for x in chosen]
        for s in ("train", "test") if chosen else ():
            window_features(every, d.windows[s], keys, args.batch_size, cpu, f"{name} layers, {s}")
        for x, key in zip(chosen, keys):
            fn = lambda w, bb=bb, x=x: pooled(bb, w, x, args.history, None, args.normalize)
            X = {s: window_features(fn, d.windows[s], key, args.batch_size, cpu, s) for s in ("train", "test")}
            r = ridge.stage1(X, d, args.alphas, args.cv_folds, args.block, cpu)[4].numpy()
            out[str(x)][name] = {k: float(np.nanmean(r[v])) for k, v in sets_.items()}
    cache.merge_analyses(run, "layers", out)
    lines = [f"{'layer':>5} {'set':>12} {'pretrained':>10} {'tuned':>8} {'change':>8}"]
    for x, row in out.items():
        for k, base in row["pretrained"].items():
            t = row.get("tuned", {}).get(k)
            lines.append(f"{x:>5} {k:>12} {base:10.4f} " + (f"{t:8.4f} {t - base:+8.4f}" if t is not None else
                                                             f"{'-':>8} {'-':>8}"))
    note = f"(the tuned profile stops at layer {layer}, the last that was tuned)" if tuned is not None else ""
    return out, "\n".join(lines + ([note] if note and max(layers) > layer else []))


def significance(run, permutations=1000, q=0.05, block=None, loaded=None):
    """Each voxel's baseline and refit test r against zero, by block permutation of the test story's
    TRs (blocks of `block` TRs, default the run's --block), the false discovery rate held at q over
    the voxels (Benjamini-Hochberg); per voxel set, how many voxels pass. The p-values go into
    voxel_r.npz (baseline_p, refit_p)."""
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
    args = copy.copy(args)  # the run's, shared by the command's other analyses
    args.block = block or args.block
    d = config.load_subject(args, args.subject)
    sets_ = ridge.sets(d, config.stage1_cv(run))
    good, out, pvals = np.flatnonzero(d.good), {}, {}
    for name, bb, w in (("baseline", pre, None), ("refit", tuned, lw)):
        if bb is None:
            continue
        X = config.features(args, layer, bb, w, d, config.scoring(args))  # from the cache, as is the fit
        mu, sd, W, *_ = config.stage1(args, X, d)
        Z, p, rows = (X["test"] - mu) / sd, np.full(len(d.good), np.nan), ridge.scored_rows(d, args.test_skip)
        for j in range(0, len(good), 16384):
            idx = good[j:j + 16384]
            p[idx] = ridge.permutation_p(Z[rows] @ W[:, idx], d.Y["test"][rows, idx], args.block, permutations).numpy()
        pvals[name + "_p"], passed = p, ridge.fdr(p, q)
        out[name] = {k: int(passed[v].sum()) for k, v in sets_.items()}
    npz = os.path.join(run, "voxel_r.npz")
    old = dict(np.load(npz))
    prefix = f"{d.name}." if any("." in k for k in old) else ""
    save_atomic(dict(old, **{prefix + k: v for k, v in pvals.items()}), npz)
    cache.merge_analyses(run, "significance", dict(out, q=q, permutations=permutations, block=args.block,
                                             protocol=config.protocol(args)))
    lines = [f"voxels whose test r > 0 at a false discovery rate of {q} ({permutations} block permutations of "
             f"{args.block} TRs)", f"{'set':>12} {'voxels':>7} " + " ".join(f"{k:>9}" for k in out)]
    lines += [f"{k:>12} {len(v):7d} " + " ".join(f"{out[m][k]:9d}" for m in out) for k, v in sets_.items()]
    return out, "\n".join(lines)


def stability(runs, vs=None):
    """Mean and standard deviation across runs of each set's change in r (refit minus baseline)."""
    def changes(group):
        rows = [{f"{s} {k}" if len(t) > 1 else k: row for s, test in t.items() for k, row in test.items()}
                for t in map(results, group)]
        return {k: [row[k]["refit_r"] - row[k]["baseline_r"] for row in rows if row[k].get("refit_r") is not None]
                for k in rows[0]}
    out, lines = {}, [f"{'group':>6} {'set':>12} {'runs':>4} {'mean change':>12} {'std':>8}"]
    for gname, group in (("A", runs), ("B", vs or [])):
        if not group:
            continue
        for k, v in changes(group).items():
            out.setdefault(gname, {})[k] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": len(v)}
            lines.append(f"{gname:>6} {k:>12} {len(v):4d} {np.mean(v):+12.4f} {np.std(v):8.4f}")
    return out, "\n".join(lines)


def plot(run, loaded=None):
    """PNG figures in the run folder; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
    npz = np.load(os.path.join(run, "voxel_r.npz"))
    multi = len(args.subjects) > 1  # keys "<subject>.baseline_r" ..., one scatter and histogram each
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(run, name), dpi=100)
        plt.close(fig)
        paths.append(os.path.join(run, name))

    for subj in map(lambda s: data.find_subject(args.data, s), args.subjects):
        r = {k.split(".")[-1]: npz[k] for k in npz.files if not multi or k.startswith(subj + ".")}
        if "refit_r" not in r:
            raise ValueError(f"{run} is a stage-1 run (--epochs 0): there is no tuned model to plot")
        plot_voxels(plt, save, subj, r, data.roi_sets(args.data, subj, len(r["baseline_r"])), f"_{subj}" if multi else "")
    metrics = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot([m["epoch"] for m in metrics], [m["train_loss"] for m in metrics], "o-")
    a1.set(xlabel="epoch", ylabel="training loss", title="training")
    a2.plot([m["epoch"] for m in metrics], [m["val_r"] for m in metrics], "o-")
    a2.set(xlabel="epoch", ylabel="validation r (trained voxels)", title="validation")
    save(fig, "curves.png")

    if args.lora_rank > 0:
        norms = lora.delta_norms(tuned)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for p in "qkvo":
            pts = [(int(k.split(".")[3]) + 1, v) for k, v in norms.items() if k.endswith("." + p)]
            if pts:
                ax.plot(*zip(*pts), "o-", label=p)
        ax.set(xlabel="transformer layer", ylabel="||scaling B A|| / ||W||", title="relative weight change")
        ax.legend()
        save(fig, "weight_change.png")

    saved = os.path.join(run, "analyses.json")
    layers = json.load(open(saved)).get("layers") if os.path.exists(saved) else None
    if layers:  # eval.py --layers: mean r against layer, a panel per voxel set
        names = list(next(iter(layers.values()))["pretrained"])
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for ax, k in zip(axes[0], names):
            for model in ("pretrained", "tuned"):
                pts = sorted((int(x), row[model][k]) for x, row in layers.items() if model in row)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=model)
            ax.set(xlabel="transformer layer", ylabel="mean test r", title=k)
            ax.legend()
        save(fig, "layers.png")
    return paths


def plot_voxels(plt, save, subj, r, rois, tag):
    """One subject's per-voxel figures: refit r against baseline r, by ROI; the change's histogram."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(r["baseline_r"], r["refit_r"], s=4, c="lightgray", label="other")
    for name, idx in rois.items():
        ax.scatter(r["baseline_r"][idx], r["refit_r"][idx], s=4, label=name)
    lim = [np.nanmin([r["baseline_r"], r["refit_r"]]), np.nanmax([r["baseline_r"], r["refit_r"]])]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlabel="baseline r (pretrained)", ylabel="tuned r (ridge refit)", title=f"{subj}: test-story r per voxel")
    ax.legend(markerscale=3)
    save(fig, f"scatter{tag}.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist((r["refit_r"] - r["baseline_r"])[np.isfinite(r["refit_r"])], bins=40)
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel="tuned r - baseline r", ylabel="voxels", title=f"{subj}: per-voxel change")
    save(fig, f"change_hist{tag}.png")


def export(run, path, loaded=None):
    """The tuned backbone merged into a plain torchaudio state dict."""
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; choose a new file (nothing was written)")
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
    if tuned is None:
        raise ValueError(f"{run} has no tuned backbone (adapter.pt); it was a stage-1 run")
    save_atomic(lora.merge_lora(copy.deepcopy(tuned)).state_dict(), path)  # the loaded run stays as it was
    return path


def parser():
    p = argparse.ArgumentParser(description="Analyses of a finished braintune run.")
    p.add_argument("run", help="run folder written by train.py")
    p.add_argument("--subject", help="cross-subject transfer: refit on this subject (e.g. S02)")
    p.add_argument("--probe", choices=["semantic", "phones"], help="linear probe, pretrained vs tuned")
    p.add_argument("--embeddings", help="word vectors, GloVe text format (default: the dataset's own)")
    p.add_argument("--lowlevel", action="store_true", help="reliance on low-level (mel band) features")
    p.add_argument("--seeds", nargs="+", help="more runs: mean and std of the change in r across runs")
    p.add_argument("--vs", nargs="+", help="a second group of runs to compare with --seeds")
    p.add_argument("--layers", nargs="?", const="all", help="the encoding r of every layer (or of 2,5,9 ...), "
                                                              "pretrained and tuned")
    p.add_argument("--significance", action="store_true", help="each voxel's r against zero by block "
                                                                 "permutation, false discovery rate 0.05")
    p.add_argument("--block", type=int, help="TRs per block of --significance's permutations (default: the run's)")
    p.add_argument("--plot", action="store_true", help="write PNG figures into the run folder")
    p.add_argument("--export", help="write the merged tuned backbone as a torchaudio state dict here")
    return p


def check(a):
    """Every flag against the run and the files it names, before any analysis runs."""
    loaded = config.load_run(a.run)  # a clear error for a missing or incomplete run
    args, _, pre, *_ = loaded
    if a.subject:
        data.find_subject(args.data, a.subject)
    for flag, runs in (("--seeds", a.seeds), ("--vs", a.vs)):
        for r in runs or []:
            if not os.path.isfile(os.path.join(r, "results.json")):
                raise ValueError(f"{flag} {r}: not the folder of a finished run (no results.json)")
    if a.vs and not a.seeds:
        raise ValueError("--vs compares with the runs of --seeds; give --seeds too")
    if a.block is not None and a.block < 1:
        raise ValueError(f"--block {a.block}: must be at least 1")
    if a.layers is not None:
        parse_layers(a.layers, len(pre.encoder.transformer.layers), args.model)
    if a.embeddings and not os.path.isfile(a.embeddings):
        raise ValueError(f"--embeddings {a.embeddings}: no such file")
    if a.export and (os.path.exists(a.export) or not os.path.isdir(os.path.dirname(os.path.abspath(a.export)))):
        raise ValueError(f"--export {a.export}: " + ("already exists; choose a new file" if os.path.exists(a.export)
                         else f"no folder {os.path.dirname(os.path.abspath(a.export))}"))
    return loaded


def main(argv=None):
    a = parser().parse_args(argv)
    loaded = check(a)  # the run, loaded once for every analysis of the command
    print(show(a.run))
    if a.subject:
        print(f"\ncross-subject transfer to {a.subject}:\n" + cross_subject(a.run, a.subject, loaded))
    if a.probe:
        print("\n" + probes.probe(a.run, a.probe, a.embeddings, loaded)[1])
    if a.lowlevel:
        print("\n" + probes.lowlevel(a.run, loaded)[1])
    if a.layers is not None:
        print("\n" + profile(a.run, a.layers, loaded)[1])
    if a.significance:
        print("\n" + significance(a.run, block=a.block, loaded=loaded)[1])
    if a.seeds:
        out, table = stability([a.run] + a.seeds, a.vs)
        cache.merge_analyses(a.run, "stability", out)
        print("\n" + table)
    if a.plot:
        print("\nwrote " + ", ".join(plot(a.run, loaded)))
    if a.export:
        print(f"\nwrote {export(a.run, a.export, loaded)}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
