"""
What a backbone's features carry, pretrained against tuned (eval.py --probe, --lowlevel): linear
probes of word meaning (BrainWavLM) and phone identity (Moussa et al.) at each word or phone of the
TextGrids, and how much of the encoding r survives removing what low-level features (mel band
energies) predict (Moussa et al.). Each result is merged into RUN/analyses.json.

    out, table = probe("runs/RUN", "semantic")      # mean r of the word vector on the test story
    res, table = lowlevel("runs/RUN")                # full and residual r per voxel set
"""
import os

import numpy as np
import torch
import torchaudio.functional as AF

import cache
import config
import data
import ridge
from model import hidden, pool_frames

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
        weights = config.layer_weights(args, backbone, lw)
        h = hidden(backbone, torch.stack(waves), layer, weights, args.normalize)  # (batch, frames, dim)
        for j, k in enumerate(group):
            first = min(int((span - (segments[k][1] - segments[k][0])) * h.shape[1] / span), h.shape[1] - 1)
            out[k] = h[j, first:].mean(0)
    return torch.stack(out)


def probe(run, kind, embeddings=None, loaded=None):
    """semantic: word vectors from features at each word (ridge, folds by story), mean r over the
    vector's dimensions on the test story. phones: phone identity, a linear (ridge) classifier on
    one-hot targets, accuracy on the test story. Pretrained against tuned backbone."""
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
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
    cache.merge_analyses(run, f"probe_{kind}", out)
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


def lowlevel(run, loaded=None):
    """Moussa et al.'s test of reliance on low-level features: encoding r refit on the backbone's
    features after removing what mel band energies predict, per voxel set, pretrained vs tuned."""
    args, layer, pre, tuned, lw = loaded or config.load_run(run)
    d = config.load_subject(args, args.subject)
    L = {s: mel_features(d.windows[s], args.history) for s in ("train", "test")}
    mu, sd = L["train"].mean(0), L["train"].std(0).clamp_min(1e-6)
    L = {s: (v - mu) / sd for s, v in L.items()}
    groups = ridge.story_folds([len(e) for e in d.windows["train"].ends], args.cv_folds)
    # the voxel sets by stage-1 cross-validated r on training stories: the same for both backbones,
    # and not chosen by the test r they report
    sets_ = ridge.sets(d, config.stage1_cv(run))
    res, table = {"sets": {k: v.tolist() for k, v in sets_.items()}}, []
    for name, bb, w in (("pretrained", pre, None), ("tuned", tuned, lw)):
        if bb is None:
            continue
        X = config.features(args, layer, bb, w, d)
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
    cache.merge_analyses(run, "lowlevel", {k: v for k, v in res.items() if k in ("pretrained", "tuned")})
    return res, "\n".join(table)
