"""
Whether a gain is real and what it is worth (eval.py --seeds, --against, --efficiency): the
spread of the change across runs, a paired comparison of two tuned runs on the same test story
(the permuted-brain control against the real one, say), and how much fMRI each backbone's
features need (Moussa & Toneva 2025: about five times less with brain-tuned features).

    out, table = stability(["runs/A", "runs/B"])           # mean and std of each set's change
    out, table = against(eval.load_run("runs/A"), eval.load_run("runs/B"))
    out, table = efficiency(eval.load_run("runs/A"), hours=[0.5, 1, 2])
"""
import dataclasses
import os

import numpy as np

import data
import guard
import ridge
from cache import read_json


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
