"""
The papers' analyses of a finished run: each a flag, each a small table, each merged into
RUN/analyses.json (other keys are kept).

    python eval.py RUN                      # the results table again, with noise-normalised r
    python eval.py RUN --subject S02        # cross-subject transfer (BrainWavLM)
    python eval.py RUN --probe semantic     # word meaning from features (BrainWavLM)
    python eval.py RUN --probe phones       # phone identity from features (Moussa et al.)
    python eval.py RUN --lowlevel           # reliance on low-level features (Moussa et al.)
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

import config
import data
import lora
import ridge
from cache import save_atomic
from model import (feature_key, hidden, layer_of, load_backbone, load_checkpoint, pool_frames, pooled, split_features,
                   window_features)


def load_run(run):
    """(args, layer, pretrained backbone, tuned backbone, tuned layer weights) of a run folder."""
    if not os.path.isdir(run):
        raise ValueError(f"{run}: no such run folder")
    for f in ("config.json", "results.json", "stage1.pt"):
        if not os.path.isfile(os.path.join(run, f)):
            raise ValueError(f"{run} is incomplete: {f} is missing (did the run finish?)")
    args = config.parse(["--resume", run])  # the run's flags, with today's defaults for newer ones
    if not os.path.isdir(args.data):
        raise ValueError(f"{args.data}: the run's dataset (--data in {run}/config.json) is not there")
    own = os.path.join(run, "tiny_pretrained.pt")  # tiny's pretrained weights travel with the run folder
    if args.weights and os.path.basename(args.weights) == "tiny_pretrained.pt" and os.path.isfile(own):
        args.weights = own
    pre, normalize = load_backbone(args.model, args.weights, args.seed)
    n_layers = len(pre.encoder.transformer.layers)
    layer = layer_of(args.layer, n_layers)
    tuned, lw = None, None
    if os.path.isfile(os.path.join(run, "adapter.pt")):
        state = load_checkpoint(os.path.join(run, "adapter.pt"))["trainable"]
        tuned = copy.deepcopy(pre)  # the same pretrained weights, read once
        lora.add_lora(tuned, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, range(layer))
        mine = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        missing = set(mine) - set(tuned.state_dict())
        if missing:
            raise ValueError(f"{run}/adapter.pt does not fit the {args.model} model of its config "
                             f"(e.g. {sorted(missing)[0]})")
        tuned.load_state_dict(mine, strict=False)
        tuned.eval()
        lw = state.get("layer_weights")
    args.normalize, args.test_skip = normalize, args.test_skip or 0  # runs from before --test-skip: none
    args.subjects = args.subject.split(",")  # a multi-subject run: the analyses of one subject use the first
    args.subject = args.subjects[0]
    return args, layer, pre, tuned, lw


def layer_weights(args, backbone, lw=None):
    """The learned layer weights of a weighted-layer run (uniform for the pretrained backbone)."""
    if args.layer != "weighted":
        return None
    return lw if lw is not None else torch.zeros(len(backbone.encoder.transformer.layers))


def merge_analyses(run, key, value):
    path = os.path.join(run, "analyses.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    old[key] = value
    save_atomic(json.dumps(old, indent=1), path)


def results(run):
    """{subject: {set: row}} from results.json, one subject or several."""
    res = json.load(open(os.path.join(run, "results.json")))
    return {k: v["test"] for k, v in res["subjects"].items()} if "subjects" in res else {res.get("subject", "-"): res["test"]}


def show(run):
    return ridge.format_table(results(run), json.load(open(os.path.join(run, "results.json"))).get("protocol"))


def load_subject(args, name):
    """One subject's data (data.Subject), held out on the run's test and validation stories."""
    return data.prepare(args.data, [name], args.test_stories, args.val_stories, history=args.history, tr=args.tr,
                        trim_start=args.trim_start, sound_start=args.sound_start)[0][0]


def stage1_cv(run):
    """The run's stage-1 cross-validated r of its first subject: what chooses the voxel sets."""
    return load_checkpoint(os.path.join(run, "stage1.pt"))[2][0][1]


def features(args, layer, backbone, lw, d, protocol=None):
    """{"train", "test"}: this backbone's features of one subject's rows, (rows, p): its windows, or,
    with a protocol (config.scoring), a paper's sliding context, Lanczos and delays."""
    return split_features(args.model, backbone, layer, layer_weights(args, backbone, lw), args.normalize,
                          {s: d.windows[s] for s in ("train", "test")}, args.history, args.batch_size,
                          torch.device("cpu"), protocol)


def stage1(args, X, d):
    """ridge.stage1 with the run's lambdas, folds and blocks, scored from the run's --test-skip row."""
    return ridge.stage1(X, d, args.alphas, args.cv_folds, args.block, torch.device("cpu"), skip=args.test_skip)


def fit(args, layer, backbone, lw, d):
    """Stage 1 on one subject with this backbone, under the run's protocol: (mu, sd, W, cv r, test r,
    the test story's block sums)."""
    return stage1(args, features(args, layer, backbone, lw, d, config.scoring(args)), d)


def cross_subject(run, subject):
    """The backbone tuned on the run's subject(s), ridge refit on another subject: test r against
    the pretrained backbone on that subject (BrainWavLM's transfer test)."""
    args, layer, pre, tuned, lw = load_run(run)
    if tuned is None:
        raise ValueError(f"{run} has no tuned backbone (adapter.pt); it was a stage-1 run")
    d = load_subject(args, subject)
    if d.name in [data.find_subject(args.data, s) for s in args.subjects]:
        print(f"note: {d.name} was tuned on in {run}; this is not transfer to a new subject")
    base, new = fit(args, layer, pre, None, d), fit(args, layer, tuned, lw, d)
    res = {"baseline_r": base[4].numpy(), "refit_r": new[4].numpy()}
    out = ridge.summarize(res, ridge.sets(d, base[3]), d.ceiling, {"baseline": base[5], "refit": new[5]})
    merge_analyses(run, f"transfer_{d.name}", dict(out, protocol=config.protocol(args)))
    return ridge.format_table({d.name: out}, config.protocol(args))


def load_embeddings(path):
    """{word: (dim,) array} from GloVe's text format (`word v1 v2 ...` per line) or the Huth lab's
    english1000sm.hf5 in ds003020 ("data" (dimensions, words), "vocab" the words as bytes)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such embeddings file")
    if path.endswith(".hf5"):
        with data.open_hf5(path) as f:
            if "data" not in f or "vocab" not in f:
                raise ValueError(f"{path}: expected 'data' (dimensions, words) and 'vocab'")
            vectors, vocab = np.asarray(f["data"], np.float32), f["vocab"][:]
        return {(w.decode() if isinstance(w, bytes) else str(w)).lower(): vectors[:, i] for i, w in enumerate(vocab)}
    out = {}
    for line in open(path, encoding="utf-8"):
        w, *v = line.rstrip().split(" ")
        out[w.lower()] = np.asarray(v, dtype=np.float32)
    return out


def default_embeddings(root):
    """The dataset's own word vectors: the synthetic data's embeddings.txt, else ds003020's English1000."""
    paths = [os.path.join(root, "derivative", f) for f in ("embeddings.txt", "english1000sm.hf5")]
    for p in paths:
        if os.path.isfile(p):
            return p
    raise ValueError(f"no word vectors in {root}: neither {paths[0]} nor {paths[1]} (python data.py fetch gets "
                     "the second; or pass --embeddings PATH)")


@torch.inference_mode()
def segment_features(args, layer, backbone, lw, wave, segments, context=4.0, batch=32):
    """Mean frame features over each (start, end) segment, heard with `context` s of audio before its
    end (BrainWavLM's 4 s windows); a longer segment is heard whole, alone: (segments, dim)."""
    spans = [max(context, end - start) for start, end in segments]  # seconds of audio each window holds
    short = [k for k, s in enumerate(spans) if s == context]
    out = [None] * len(segments)
    for group in [short[i:i + batch] for i in range(0, len(short), batch)] + [[k] for k, s in enumerate(spans)
                                                                              if s > context]:
        span = spans[group[0]]
        n = round(span * data.SR)
        waves = []
        for k in group:
            e = round(segments[k][1] * data.SR)
            w = torch.from_numpy(np.array(wave[max(e - n, 0):min(e, len(wave))]))
            waves.append(torch.nn.functional.pad(w, (n - len(w), 0)))
        h = hidden(backbone, torch.stack(waves), layer, layer_weights(args, backbone, lw), args.normalize)  # (batch, frames, dim)
        for j, k in enumerate(group):
            first = min(int((span - (segments[k][1] - segments[k][0])) * h.shape[1] / span), h.shape[1] - 1)
            out[k] = h[j, first:].mean(0)
    return torch.stack(out)


def probe(run, kind, embeddings=None):
    """semantic: word vectors from features at each word (ridge, folds by story), mean r over the
    vector's dimensions on the test story. phones: phone identity, a linear (ridge) classifier on
    one-hot targets, accuracy on the test story. Pretrained against tuned backbone."""
    args, layer, pre, tuned, lw = load_run(run)
    subj = data.find_subject(args.data, args.subject)
    train_s, val_s, test_s = data.splits(args.data, subj, args.test_stories, args.val_stories)
    emb = load_embeddings(embeddings or default_embeddings(args.data)) if kind == "semantic" else None
    items = {}  # story -> (segments, labels)
    for s in train_s + val_s + test_s:
        phones, words = data.words_and_phones(data.textgrid_path(args.data, s))
        segs = [w for w in words if w[2].lower() in emb] if kind == "semantic" else phones
        items[s] = ([(a, b) for a, b, _ in segs], [lab.lower() for _, _, lab in segs])
    labels = sorted({lab for _, labs in items.values() for lab in labs})
    if kind == "semantic":
        target = {s: torch.as_tensor(np.stack([emb[w] for w in labs])) for s, (_, labs) in items.items()}
    else:
        target = {s: torch.nn.functional.one_hot(torch.tensor([labels.index(l) for l in labs]), len(labels)).float()
                  for s, (_, labs) in items.items()}
    fit_s = train_s + val_s
    audio = data.load_audio(args.data, list(items))
    out = {}
    for name, bb, w in (("pretrained", pre, None), ("tuned", tuned, lw)):
        if bb is None:
            continue
        X = {s: segment_features(args, layer, bb, w, audio[s], items[s][0]) for s in items}
        Xtr = torch.cat([X[s] for s in fit_s])
        mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
        groups = ridge.story_folds([len(X[s]) for s in fit_s], args.cv_folds)
        Wp, _ = ridge.fit_ridge((Xtr - mu) / sd, torch.cat([target[s] for s in fit_s]), args.alphas, groups)
        pred = torch.cat([(X[s] - mu) / sd @ Wp for s in test_s])
        truth = torch.cat([target[s] for s in test_s])
        if kind == "semantic":
            out[name] = float(ridge.pearson(pred, truth).mean())
        else:
            out[name] = float((pred.argmax(1) == truth.argmax(1)).float().mean())
    merge_analyses(run, f"probe_{kind}", out)
    metric = "mean r" if kind == "semantic" else "accuracy"
    return out, "\n".join(f"{kind} probe {metric}: {k} {v:.4f}" for k, v in out.items())


def mel_features(windows, history, n_mels=32):
    """Low-level features per fMRI frame: log mel band energies of its window, pooled in TR bins
    like the backbone's frames: (rows, history * n_mels)."""
    fb = torchaudio_fbanks(n_mels)
    out = []
    for wave, *_ in torch.utils.data.DataLoader(windows, batch_size=64):
        spec = torch.stft(wave, 400, 320, window=torch.hann_window(400), return_complex=True).abs() ** 2
        mel = torch.log(1e-6 + (spec.transpose(1, 2) @ fb))  # (batch, frames, n_mels)
        out.append(pool_frames(mel, history).flatten(1))
    return torch.cat(out)


def torchaudio_fbanks(n_mels):
    import torchaudio.functional as AF
    return AF.melscale_fbanks(201, 20.0, data.SR / 2, n_mels, data.SR)


def lowlevel_r(X, L, Ytrain, Ytest, groups, alphas):
    """Test r of encoding models on features X and on X with the part that the low-level features L
    predict removed (least squares from L to X, fit on training rows). X, L: {"train", "test"} z-scored."""
    # least squares, not cross-validated ridge: a shrunken fit would leave part of what L explains
    # in X; a tiny ridge (1e-6 of L's scale) only keeps the solve stable
    G = L["train"].T @ L["train"]
    B = torch.linalg.solve(G + 1e-6 * G.diagonal().mean() * torch.eye(len(G)), L["train"].T @ X["train"])
    out = []
    for F_ in (X, {k: X[k] - L[k] @ B for k in X}):
        W, _ = ridge.fit_ridge(F_["train"], Ytrain, alphas, groups)
        out.append(ridge.pearson(F_["test"] @ W, Ytest))
    return out


def lowlevel(run):
    """Moussa et al.'s test of reliance on low-level features: encoding r refit on the backbone's
    features after removing what mel band energies predict, per voxel set, pretrained vs tuned."""
    args, layer, pre, tuned, lw = load_run(run)
    d = load_subject(args, args.subject)
    L = {s: mel_features(d.windows[s], args.history) for s in ("train", "test")}
    mu, sd = L["train"].mean(0), L["train"].std(0).clamp_min(1e-6)
    L = {s: (v - mu) / sd for s, v in L.items()}
    groups = ridge.story_folds([len(e) for e in d.windows["train"].ends], args.cv_folds)
    # the voxel sets by stage-1 cross-validated r on training stories: the same for both backbones,
    # and not chosen by the test r they report
    sets_ = ridge.sets(d, stage1_cv(run))
    res, table = {"sets": {k: v.tolist() for k, v in sets_.items()}}, []
    for name, bb, w in (("pretrained", pre, None), ("tuned", tuned, lw)):
        if bb is None:
            continue
        X = features(args, layer, bb, w, d)
        m, s_ = X["train"].mean(0), X["train"].std(0).clamp_min(1e-6)
        X = {k: (v - m) / s_ for k, v in X.items()}
        r = dict(zip(("full", "residual"), lowlevel_r(X, L, d.Y["train"], d.Y["test"][:, :], groups, args.alphas)))
        r = {k: np.where(d.good, v.numpy(), np.nan) for k, v in r.items()}
        res[name] = {k: {"full_r": float(np.nanmean(r["full"][v])), "residual_r": float(np.nanmean(r["residual"][v]))}
                     for k, v in sets_.items()}
        res[name + "_voxel_r"] = {k: v.tolist() for k, v in r.items()}
        for k, v in res[name].items():
            table.append(f"{name:>10} {k:>10} full r {v['full_r']:.4f}  without low-level {v['residual_r']:.4f}  "
                         f"loss {v['full_r'] - v['residual_r']:+.4f}")
    merge_analyses(run, "lowlevel", {k: v for k, v in res.items() if k in ("pretrained", "tuned")})
    return res, "\n".join(table)


def parse_layers(text, depth, model):
    """--layers: 'all' or comma-separated 1-based layers within the model."""
    try:
        layers = list(range(1, depth + 1)) if text == "all" else [int(x) for x in text.split(",")]
    except ValueError:
        layers = []
    if not layers or not all(1 <= x <= depth for x in layers):
        raise ValueError(f"--layers {text}: expected 'all' or layers from 1..{depth} of {model}, comma-separated")
    return sorted(set(layers))


def profile(run, text="all"):
    """The layer-wise encoding profile: for each layer, its features pooled into the run's TR bins,
    ridge refit on the run's training stories (stage 1's folds, lambdas and z-scoring), the test r of
    each voxel set (chosen by stage-1 cv r); pretrained, and tuned on layers 1..L, those that were
    tuned (above L the tuned model's weights are the pretrained ones). One forward per window and backbone
    yields every layer, each cached, then loaded one at a time."""
    args, layer, pre, tuned, lw = load_run(run)
    layers = parse_layers(text, len(pre.encoder.transformer.layers), args.model)
    d = load_subject(args, args.subject)
    sets_ = ridge.sets(d, stage1_cv(run))
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
    merge_analyses(run, "layers", out)
    lines = [f"{'layer':>5} {'set':>12} {'pretrained':>10} {'tuned':>8} {'change':>8}"]
    for x, row in out.items():
        for k, base in row["pretrained"].items():
            t = row.get("tuned", {}).get(k)
            lines.append(f"{x:>5} {k:>12} {base:10.4f} " + (f"{t:8.4f} {t - base:+8.4f}" if t is not None else
                                                             f"{'-':>8} {'-':>8}"))
    note = f"(the tuned profile stops at layer {layer}, the last that was tuned)" if tuned is not None else ""
    return out, "\n".join(lines + ([note] if note and max(layers) > layer else []))


def significance(run, permutations=1000, q=0.05, block=None):
    """Each voxel's baseline and refit test r against zero, by block permutation of the test story's
    TRs (blocks of `block` TRs, default the run's --block), the false discovery rate held at q over
    the voxels (Benjamini-Hochberg); per voxel set, how many voxels pass. The p-values go into
    voxel_r.npz (baseline_p, refit_p)."""
    args, layer, pre, tuned, lw = load_run(run)
    args.block = block or args.block
    d = load_subject(args, args.subject)
    sets_ = ridge.sets(d, stage1_cv(run))
    good, out, pvals = np.flatnonzero(d.good), {}, {}
    for name, bb, w in (("baseline", pre, None), ("refit", tuned, lw)):
        if bb is None:
            continue
        X = features(args, layer, bb, w, d, config.scoring(args))  # from the cache, as is the fit
        mu, sd, W, *_ = stage1(args, X, d)
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
    merge_analyses(run, "significance", dict(out, q=q, permutations=permutations, block=args.block,
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


def plot(run):
    """PNG figures in the run folder; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    args, layer, pre, tuned, lw = load_run(run)
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
        rois, tag = data.roi_sets(args.data, subj, len(r["baseline_r"])), f"_{subj}" if multi else ""
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


def export(run, path):
    """The tuned backbone merged into a plain torchaudio state dict."""
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; choose a new file (nothing was written)")
    args, layer, pre, tuned, lw = load_run(run)
    if tuned is None:
        raise ValueError(f"{run} has no tuned backbone (adapter.pt); it was a stage-1 run")
    save_atomic(lora.merge_lora(tuned).state_dict(), path)
    return path


def main(argv=None):
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
    a = p.parse_args(argv)
    args = load_run(a.run)[0]  # a clear error for a missing or incomplete run, before any work
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
        parse_layers(a.layers, len(load_run(a.run)[2].encoder.transformer.layers), args.model)
    if a.embeddings and not os.path.isfile(a.embeddings):
        raise ValueError(f"--embeddings {a.embeddings}: no such file")
    if a.export and (os.path.exists(a.export) or not os.path.isdir(os.path.dirname(os.path.abspath(a.export)))):
        raise ValueError(f"--export {a.export}: " + ("already exists; choose a new file" if os.path.exists(a.export)
                         else f"no folder {os.path.dirname(os.path.abspath(a.export))}"))
    print(show(a.run))
    if a.subject:
        print(f"\ncross-subject transfer to {a.subject}:\n" + cross_subject(a.run, a.subject))
    if a.probe:
        print("\n" + probe(a.run, a.probe, a.embeddings)[1])
    if a.lowlevel:
        print("\n" + lowlevel(a.run)[1])
    if a.layers is not None:
        print("\n" + profile(a.run, a.layers)[1])
    if a.significance:
        print("\n" + significance(a.run, block=a.block)[1])
    if a.seeds:
        out, table = stability([a.run] + a.seeds, a.vs)
        merge_analyses(a.run, "stability", out)
        print("\n" + table)
    if a.plot:
        print("\nwrote " + ", ".join(plot(a.run)))
    if a.export:
        print(f"\nwrote {export(a.run, a.export)}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
