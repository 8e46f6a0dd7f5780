"""
Whether a gain is real and what it is worth (eval.py --seeds, --against, --efficiency,
--significance; sweep.py): the spread of the change across runs, a paired comparison of two tuned
runs on the same test story (the permuted-brain control against the real one, say), the change
of several settings over several seeds with an interval over both the seeds and the test story's
blocks, how much fMRI each backbone's features need (Moussa & Toneva 2025: about five times less
with brain-tuned features), and each voxel's r against zero.

    out, table = stability(["runs/A", "runs/B"])           # mean and std of each set's change
    out, table = against(eval.load_run("runs/A"), eval.load_run("runs/B"))
    change = across_seeds(pairs, sets_)                    # (resamples, sets, settings)
    out, table = efficiency(eval.load_run("runs/A"), hours=[0.5, 1, 2])
    out, table = significance(eval.load_run("runs/A"))      # each voxel's r against zero
"""
import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

import cache
import config
import data
import guard
import ridge
import runfolder
import voxels
from cache import read_json
from model import layer_of


def results(folder):
    """{subject: {set: row}} from results.json, one subject or several."""
    res = read_json(os.path.join(folder, "results.json"))
    if "subjects" in res:
        return {k: v["test"] for k, v in res["subjects"].items()}
    return {res.get("subject", "-"): res["test"]}


def stability(runs, vs=None):
    """Mean and standard deviation across runs of each set's change in r (refit minus
    baseline)."""
    def changes(group):
        rows = [{f"{s} {k}" if len(t) > 1 else k: row for s, test in t.items()
                 for k, row in test.items()} for t in map(results, group)]
        return {k: [row[k]["refit_r"] - row[k]["baseline_r"] for row in rows
                    if row[k].get("refit_r") is not None] for k in rows[0]}
    out = {}
    lines = [f"{'group':>6} {'set':>12} {'runs':>4} {'mean change':>12} {'std':>8}"]
    for gname, group in (("A", runs), ("B", vs or [])):
        if not group:
            continue
        for k, v in changes(group).items():
            out.setdefault(gname, {})[k] = {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                           "runs": len(v)}
            lines.append(f"{gname:>6} {k:>12} {len(v):4d} {np.mean(v):+12.4f} {np.std(v):8.4f}")
    return out, "\n".join(lines)


def check_groups(run, seeds, vs, against):
    """--seeds, --vs and --against (eval.py): folders of finished runs, each run given once (the
    run itself is the first of --seeds' group), --vs only beside --seeds."""
    seen = {os.path.realpath(run): run}
    if against and os.path.realpath(against) in seen:
        raise ValueError(f"--against {against}: the run itself, which differs from itself by "
                         "nothing; give another run")
    for flag, r in [("--seeds", r) for r in seeds or []] + [("--vs", r) for r in vs or []]:
        if not os.path.isfile(os.path.join(r, "results.json")):
            raise ValueError(f"{flag} {r}: not the folder of a finished run (no results.json)")
        if os.path.realpath(r) in seen:
            raise ValueError(f"{flag} {r}: the same run as {seen[os.path.realpath(r)]} (the run "
                             "itself is the first of --seeds' group); give each run once")
        seen[os.path.realpath(r)] = r
    if vs and not seeds:
        raise ValueError("--vs compares with the runs of --seeds; give --seeds too")


def comparable(a, b):
    """Refuses, in one sentence, two runs (eval.Run) whose refits cannot be paired: another
    subject, test story, protocol or baseline (backbone, layer, windows)."""
    res = [read_json(os.path.join(r.folder, "results.json")) for r in (a, b)]
    stories = [read_json(os.path.join(r.folder, "config.json"))["stories"] for r in (a, b)]
    base = [guard.load_array(os.path.join(r.folder, "voxel_r.npz"), None) for r in (a, b)]
    first = [data.find_subject(r.args.data, r.subjects[0]) for r in (a, b)]
    tests = [s[f]["test"] for s, f in zip(stories, first)]
    why = None
    if first[0] != first[1]:
        why = f"the subjects differ ({first[0]}, {first[1]})"
    elif tests[0] != tests[1]:
        why = f"the test stories differ ({tests[0]}, {tests[1]})"
    elif res[0]["protocol"] != res[1]["protocol"]:
        why = "the protocols differ"
    elif not all(r.tuned is not None for r in (a, b)):
        why = "one of them has no tuned backbone (a stage-1 run)"
    elif not np.allclose(base[0]["baseline_r"], base[1]["baseline_r"], equal_nan=True):
        why = "their baselines differ (another backbone, layer, history or dataset)"
    if why:
        raise ValueError(f"--against {b.folder}: cannot be paired with {a.folder}: {why}")


def against(a, b):
    """The refit r of two tuned runs (eval.Run) of the same subject on the same test story, set by
    set: each run's mean, the paired difference (b - a) and its 95% block-bootstrap interval, the
    same resampled blocks of the test story for both."""
    comparable(a, b)
    d = a.subject(a.subjects[0])
    fits = [r.fit(r.tuned, d) for r in (a, b)]  # the refits, from the cache
    sets = ridge.sets(d, a.stage1_cv())
    ci = ridge.difference_ci(fits[0].blocks, fits[1].blocks, sets)
    out = {}
    for k, idx in sets.items():
        ra, rb = (float(np.nanmean(f.test_r.numpy()[idx])) for f in fits)
        out[k] = dict(n_voxels=int(len(idx)), a_refit_r=ra, b_refit_r=rb, difference=rb - ra,
                      difference_ci=ci[k])
    lines = [f"A {a.folder}", f"B {b.folder}",
             f"{'set':>12} {'voxels':>7} {'A refit r':>10} {'B refit r':>10} "
             f"{'B - A [95% interval]':>26}"]
    for k, row in out.items():
        lo, hi = row["difference_ci"]
        lines.append(f"{k:>12} {row['n_voxels']:7d} {row['a_refit_r']:10.4f} "
                     f"{row['b_refit_r']:10.4f} {row['difference']:+9.4f} [{lo:+.4f}, {hi:+.4f}]")
    return dict(sets=out, a=a.folder, b=b.folder, protocol=a.protocol()), "\n".join(lines)


def across_seeds(pairs, sets_, resamples=1000, seed=0):
    """The change in each set's mean r (refit minus baseline) of several settings, each run with
    the same seeds, in a bootstrap over the seeds and the test story's blocks. pairs[s][k]: the
    (baseline, refit) BlockSums of setting k's run with seed s; sets_[s]: seed s's voxel sets (the
    same names for every seed). Each resample draws the test story's blocks with replacement, the
    same draws for every run (ridge.bootstrap_means), and the seeds with replacement
    (default_rng(seed + 1)), the same draws for every setting, and averages the drawn seeds'
    changes: (resamples, sets, settings). The difference of two settings' columns is their paired
    difference, same seeds and same blocks."""
    assert all(list(s) == list(sets_[0]) for s in sets_), "the seeds' voxel sets differ"
    change = []  # per seed: (resamples, sets, settings)
    for runs, s in zip(pairs, sets_):
        m = ridge.bootstrap_means([b for pair in runs for b in pair], s, resamples, seed)
        change.append((m[..., 1::2] - m[..., 0::2]).numpy())
    change = np.stack(change, -1)  # (resamples, sets, settings, seeds)
    n = len(pairs)
    draws = np.random.default_rng(seed + 1).integers(0, n, (resamples, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])  # (resamples, seeds)
    return np.einsum("rjks,rs->rjk", change, counts) / n


def bootstrap_p(d):
    """Two-sided p-value of each column of bootstrap draws d (resamples, ...) against zero:
    twice the smaller share of draws on either side of it, (1 + count) / (1 + resamples), at most
    1 (a percentile interval excludes zero at 95% where p < 0.05)."""
    below, above = ((1 + x.sum(0)) / (1 + len(d)) for x in (d <= 0, d >= 0))
    return np.minimum(1.0, 2 * np.minimum(below, above))


@dataclass
class Seed:
    """One seed's finished runs, one per setting, read back and paired."""
    seed: int
    sets: dict  # {set: (n,) voxel indices}: all, each ROI, and topN by the reference run's stage 1
    pairs: list  # [(baseline, refit) ridge.BlockSums], one per setting
    base: np.ndarray  # (settings, sets) mean baseline r
    refit: np.ndarray  # (settings, sets) mean refit r


def voxel_r(folder, subject):
    """{"baseline_r", "refit_r"}: (voxels,) each, of the run's subject (voxel_r.npz)."""
    with np.load(os.path.join(folder, "voxel_r.npz")) as f:
        return {k: f[k] if k in f.files else f[f"{subject}.{k}"] for k in ("baseline_r", "refit_r")}


def read_seed(folders, seed):
    """A Seed of one seed's run folders, one per setting (the reference first): the voxel sets
    are the reference run's (its first subject's usable voxels, ROIs and topN by its stage-1 cv
    r), and every run must have the same test blocks and usable voxels, so that the runs pair."""
    ref, cfg = folders[0], read_json(os.path.join(folders[0], "config.json"))["args"]
    blocks = [runfolder.read_blocks(f) for f in folders]
    subject = next(iter(blocks[0]))
    r = [voxel_r(f, subject) for f in folders]
    good = np.isfinite(r[0]["baseline_r"])
    first, *_ = runfolder.read_stage1(ref)
    rois = voxels.roi_sets(data.roi_path(cfg["data"], subject), len(good))
    sets_ = ridge.voxel_sets(good, rois, first.init.cv_r, voxels.parse_roi(cfg["roi"]).n)
    for folder, b, x in zip(folders, blocks, r):
        why = None
        if b.get(subject, {}).get("refit") is None:
            why = f"it has no refit of {subject} (a stage-1 run, or another subject)"
        elif not torch.equal(b[subject]["refit"].rows, blocks[0][subject]["baseline"].rows):
            why = "its test blocks differ (another test story, --test-skip or --block)"
        elif not np.array_equal(np.isfinite(x["baseline_r"]), good):
            why = "its usable voxels differ"
        if why:
            raise ValueError(f"{folder}: cannot be paired with {ref}: {why}")
    means = {k: np.array([[np.nanmean(x[k][i]) for i in sets_.values()] for x in r])
             for k in ("baseline_r", "refit_r")}
    pairs = [(b[subject]["baseline"], b[subject]["refit"]) for b in blocks]
    return Seed(seed, sets_, pairs, means["baseline_r"], means["refit_r"])


def sweep_statistics(seeds, settings, alpha=0.05):
    """{set: {setting: row}}: each setting's baseline and refit r and change (refit minus
    baseline), means over the seeds, the change's 95% interval (across_seeds) and the
    seeds' standard deviation; from the second setting on, the paired difference from the first
    with its interval, its bootstrap p (bootstrap_p) and whether it survives Holm's
    correction over every comparison of the table (holm)."""
    names = list(seeds[0].sets)
    m = len(names) * (len(settings) - 1)  # the comparisons with the reference
    # the smallest p, 2 / (1 + resamples), at most half of Holm's first threshold, alpha / m
    resamples = max(1000, int(np.ceil(4 * m / alpha)))
    change = across_seeds([s.pairs for s in seeds], [s.sets for s in seeds], resamples)
    diff = change - change[..., :1]  # (resamples, sets, settings)
    p = bootstrap_p(diff[..., 1:])  # (sets, settings - 1)
    held = holm(p.ravel(), alpha).reshape(p.shape) if m else p
    point = np.stack([s.refit - s.base for s in seeds])  # (seeds, settings, sets)
    out = {}
    for j, name in enumerate(names):
        out[name] = {}
        for k, setting in enumerate(settings):
            lo, hi = np.percentile(change[:, j, k], [2.5, 97.5])
            row = dict(voxels=[len(s.sets[name]) for s in seeds],
                       baseline_r=float(np.mean([s.base[k, j] for s in seeds])),
                       refit_r=float(np.mean([s.refit[k, j] for s in seeds])),
                       change=float(point[:, k, j].mean()), change_ci=[float(lo), float(hi)],
                       sd=float(point[:, k, j].std(ddof=1)) if len(seeds) > 1 else None,
                       seeds={str(s.seed): float(point[i, k, j]) for i, s in enumerate(seeds)})
            if k:
                lo, hi = np.percentile(diff[:, j, k], [2.5, 97.5])
                row.update(difference=float((point[:, k, j] - point[:, 0, j]).mean()),
                           difference_ci=[float(lo), float(hi)], p=float(p[j, k - 1]),
                           holm=bool(held[j, k - 1]))
            out[name][setting] = row
    return dict(sets=out, resamples=resamples, comparisons=m, alpha=alpha,
                blocks=len(seeds[0].pairs[0][0].rows))


def format_sweep(stats, settings):
    """The table of sweep_statistics(), a row per set and setting, under its legend."""
    w = max(12, *map(len, settings))
    lines = [f"change: refit r - baseline r of each set's mean r, the mean over the seeds; its 95% "
             f"interval: a bootstrap over the seeds and the test story's {stats['blocks']} blocks "
             f"({stats['resamples']} resamples); sd: the seeds' standard deviation",
             f"vs reference: the paired difference from {settings[0]} (same seeds, same test "
             f"blocks); p: its bootstrap p; holm: whether it survives Holm's correction over "
             f"{stats['comparisons']} comparisons at {stats['alpha']}",
             f"{'set':>12} {'voxels':>6} {'setting':<{w}} {'baseline r':>10} {'refit r':>8} "
             f"{'change [95% interval]':>27} {'sd':>7} {'vs reference [95% interval]':>27} "
             f"{'p':>6} holm"]
    for name, rows in stats["sets"].items():
        for setting, row in rows.items():
            line = (f"{name:>12} {row['voxels'][0]:6d} {setting:<{w}} {row['baseline_r']:10.4f} "
                    f"{row['refit_r']:8.4f} "
                    f"{row['change']:+8.4f} [{row['change_ci'][0]:+.4f}, "
                    f"{row['change_ci'][1]:+.4f}] {ridge.cell(row['sd'], 7)}")
            if "difference" in row:
                lo, hi = row["difference_ci"]
                line += (f" {row['difference']:+8.4f} [{lo:+.4f}, {hi:+.4f}] {row['p']:6.3f} "
                         f"{'yes' if row['holm'] else 'no'}")
            lines.append(line)
    return "\n".join(lines)


def analyses_deltas(folder, probe=None, subject=None, downstream=None):
    """Tuned minus pretrained in what eval.py merged into RUN/analyses.json, for each analysis
    asked (None where it has not run): {"probe": the probe's score, "transfer": the change in
    mean r on the other subject's set of the run's --roi (else all), "downstream": the task's
    accuracy (micro-F1 for phonemes) at the layer the run tuned}."""
    path, cfg = os.path.join(folder, "analyses.json"), read_json(os.path.join(folder,
                                                                              "config.json"))
    have, out = read_json(path) if os.path.isfile(path) else {}, {}
    if probe:
        x = have.get(f"probe_{probe}")
        out["probe"] = x["tuned"] - x["pretrained"] if x else None
    if subject:
        x = have.get(f"transfer_{data.find_subject(cfg['args']['data'], subject)}")
        k = cfg["args"]["roi"] if x and cfg["args"]["roi"] in x else "all"
        out["transfer"] = x[k]["refit_r"] - x[k]["baseline_r"] if x else None
    if downstream:
        x = have.get("downstream", {}).get(downstream, {}).get("layers", {})
        x = x.get(str(tuned_layer(folder)), {}).get("difference")
        out["downstream"] = x["accuracy" if "accuracy" in x else "micro_f1"]["value"] if x else None
    return out


def tuned_layer(folder):
    """The transformer layer a run read and tuned (its --layer resolved: model.layer_of)."""
    args = read_json(os.path.join(folder, "config.json"))["args"]
    return layer_of(args["layer"], config.architecture(args["model"])["encoder_num_layers"])


def format_columns(cols):
    """{title: {setting: [value or None, one per seed]}} as a table: a row per setting, each
    column's mean over the seeds (sd)."""
    settings = list(next(iter(cols.values())))
    w = max(12, *map(len, settings))
    lines = [f"{'setting':<{w}}" + "".join(f" {t:>24}" for t in cols)]
    for setting in settings:
        cells = []
        for values in (c[setting] for c in cols.values()):
            ok = None not in values
            sd = f"{np.std(values, ddof=1):.4f}" if ok and len(values) > 1 else "-"
            cells.append(f"{np.mean(values):+.4f} ({sd})" if ok else "-")
        lines.append(f"{setting:<{w}}" + "".join(f" {c:>24}" for c in cells))
    return "\n".join(lines)


def holm(p, alpha=0.05):
    """Holm's step-down correction: which of m p-values are rejected with the family-wise error
    held at alpha (the k-th smallest against alpha / (m - k + 1), stopping at the first that
    fails)."""
    p = np.asarray(p, dtype=float)
    order, m = np.argsort(p, kind="stable"), len(p)
    passed = p[order] <= alpha / (m - np.arange(m))
    k = m if passed.all() else int(np.argmin(passed))  # the first that fails
    out = np.zeros(m, bool)
    out[order[:k]] = True
    return out


def training_subset(d, X, stories):
    """Subject d (data.Subject) and its features X {"train", "test"} with the training split
    restricted to `stories`, whole, in the split's own order."""
    w, Y = d.windows["train"], d.Y["train"]
    keep = [i for i, s in enumerate(w.stories) if s in stories]
    names = [w.stories[i] for i in keep]
    timing = dict(w.timing)
    windows = data.Windows(dict(zip(names, (w.waves[i] for i in keep))),
                           {w.stories[i]: len(w.ends[i]) for i in keep}, names,
                           keys=dict(zip(names, (w.keys[i] for i in keep))) if w.keys else None,
                           **timing)
    responses = data.Responses([Y.parts[i] for i in keep], Y.good,
                               [Y.keys[i] for i in keep] if Y.keys else None)
    rows = np.concatenate([np.arange(w.starts[i], w.starts[i + 1]) for i in keep])
    sub = dataclasses.replace(d, windows=dict(d.windows, train=windows),
                              Y=dict(d.Y, train=responses))
    return sub, dict(X, train=X["train"][rows])


def hours_grid(hours, story_hours):
    """--hours as a list, or by default doublings up to all the training data, from the first
    two stories' hours on."""
    total = sum(story_hours)
    if hours:
        return sorted(h for h in hours if h <= total) + [total]
    least, grid = sum(story_hours[:2]), [total]
    while grid[0] / 2 >= least:
        grid.insert(0, grid[0] / 2)
    return grid


def efficiency(run, hours=None, seed=0):
    """The test story's encoding r of ridges fit on growing subsets of the training stories
    (whole stories, in a seeded order, up to about each number of hours; the last point all of
    them, which is the run's own fit), pretrained and tuned features, each voxel set; and per set
    the fewest hours with which the tuned features reach the pretrained features' r on all the
    data. The features come from the cache."""
    d = run.subject(run.subjects[0])
    sets = ridge.sets(d, run.stage1_cv())
    w = d.windows["train"]
    order = list(np.random.default_rng(seed).permutation(len(w.stories)))
    story_hours = [len(w.ends[i]) * run.args.tr / 3600 for i in order]
    models = [("pretrained", run.pretrained), ("tuned", run.tuned)]
    X = {name: run.features(ex, d, run.args.protocol) for name, ex in models if ex is not None}
    curve = []
    for h in hours_grid(hours, story_hours):
        n = max(2, int(np.searchsorted(np.cumsum(story_hours), h + 1e-9, side="right")))
        chosen = [w.stories[i] for i in order[:n]]
        point = dict(hours=float(sum(story_hours[:n])), stories=n)
        for name, x in X.items():
            sub, xs = training_subset(d, x, chosen)
            folds = min(run.settings.folds, n)
            fit = ridge.fit_encoding(xs, sub, dataclasses.replace(run.settings, folds=folds))
            point[name] = {k: float(np.nanmean(fit.test_r.numpy()[v])) for k, v in sets.items()}
        curve.append(point)
    reach = {}
    for k in sets:
        target = curve[-1]["pretrained"][k]
        hit = [p["hours"] for p in curve if "tuned" in p and p["tuned"][k] >= target]
        reach[k] = hit[0] if hit else None
    lines = [f"{'hours':>7} {'stories':>7} {'set':>12} {'pretrained':>10} {'tuned':>8}"]
    for p in curve:
        for k in sets:
            tuned = f"{p['tuned'][k]:8.4f}" if "tuned" in p else f"{'-':>8}"
            lines.append(f"{p['hours']:7.3f} {p['stories']:7d} {k:>12} "
                         f"{p['pretrained'][k]:10.4f} {tuned}")
    lines += [f"{k}: the tuned features reach the pretrained r on all "
              f"{curve[-1]['hours']:.3f} h with " + (f"{h:.3f} h" if h is not None else "none of "
                                                       "these subsets") for k, h in reach.items()]
    return dict(curve=curve, reach=reach, protocol=run.protocol()), "\n".join(lines)


def significance(run, permutations=1000, q=0.05, block=None):
    """Each voxel's baseline and refit test r against zero, by block permutation of the test
    story's TRs (blocks of `block` TRs, default the run's --block), the false discovery rate held
    at q over the voxels (Benjamini-Hochberg); per voxel set, how many voxels pass. The p-values
    go into voxel_r.npz (baseline_p, refit_p). run: an eval.Run."""
    settings = dataclasses.replace(run.settings, block=block or run.settings.block)
    d = run.subject(run.subjects[0])
    sets = ridge.sets(d, run.stage1_cv())
    good, out, pvals = np.flatnonzero(d.good), {}, {}
    rows = ridge.scored_rows(d, settings.test_skip)
    for name, ex in (("baseline", run.pretrained), ("refit", run.tuned)):
        if ex is None:
            continue
        X = run.features(ex, d, run.args.protocol)  # from the cache, as is the fit
        fit = ridge.fit_encoding(X, d, settings, run.device)
        Z, p = (X["test"] - fit.mu) / fit.sd, np.full(len(d.good), np.nan)
        for j in range(0, len(good), 16384):
            idx = good[j:j + 16384]
            pred, y = Z[rows] @ fit.W[:, idx], d.Y["test"][rows, idx]
            p[idx] = ridge.permutation_p(pred, y, settings.block, permutations).numpy()
        pvals[name + "_p"], passed = p, ridge.fdr(p, q)
        out[name] = {k: int(passed[v].sum()) for k, v in sets.items()}
    npz = os.path.join(run.folder, "voxel_r.npz")
    old = guard.load_array(npz, None)
    prefix = f"{d.name}." if any("." in k for k in old) else ""
    cache.save_atomic(dict(old, **{prefix + k: v for k, v in pvals.items()}), npz)
    cache.merge_analyses(run.folder, "significance", dict(
        out, q=q, permutations=permutations, block=settings.block, protocol=run.protocol()))
    lines = [f"voxels whose test r > 0 at a false discovery rate of {q} ({permutations} block "
             f"permutations of {settings.block} TRs)",
             f"{'set':>12} {'voxels':>7} " + " ".join(f"{k:>9}" for k in out)]
    lines += [f"{k:>12} {len(v):7d} " + " ".join(f"{out[m][k]:9d}" for m in out)
              for k, v in sets.items()]
    return out, "\n".join(lines)
