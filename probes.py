"""
What a backbone's features carry, pretrained against tuned (eval.py --probe, --lowlevel, --layers):
linear probes of word meaning (BrainWavLM) and phone identity (Moussa et al.) at each word or phone
of the TextGrids, how much of the encoding r survives removing what low-level features (mel band
energies) predict (Moussa et al.), and the encoding r of each layer. Each result is merged into
RUN/analyses.json.

    run = eval.load_run("runs/RUN")
    out, table = probe(run, "semantic")      # mean r of the word vector on the test story
    res, table = lowlevel(run)               # full and residual r per voxel set
    out, table = profile(run, [2, 5, 9])     # the encoding r of each layer
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

import cache
import data
import ridge
import textgrid
import voxels
from features import window_features
from model import Extractor, pool_frames


def load_embeddings(path):
    """{word: (dim,) array} from GloVe's text format (`word v1 v2 ...` per line) or the Huth lab's
    english1000sm.hf5 in ds003020 ("data" (dimensions, words), "vocab" the words as bytes)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such embeddings file")
    if path.endswith(".hf5"):
        with voxels.open_hf5(path) as f:
            if "data" not in f or "vocab" not in f:
                raise ValueError(f"{path}: expected 'data' (dimensions, words) and 'vocab'")
            vectors, vocab = np.asarray(f["data"], np.float32), f["vocab"][:]
        words = [(w.decode() if isinstance(w, bytes) else str(w)).lower() for w in vocab]
        return {w: vectors[:, i] for i, w in enumerate(words)}
    out, dim = {}, None
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                w, *v = line.rstrip().split(" ")
                vector = np.asarray([float(x) for x in v], np.float32)  # ValueError: not numbers
                if not len(v) or len(v) != (dim or len(v)) or not np.isfinite(vector).all():
                    raise ValueError
                out[w.lower()], dim = vector, len(v)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected GloVe's text format") from None
    except ValueError:
        raise ValueError(f"{path}: line {i} is not a word and {dim or 'its'} finite numbers, "
                         "space-separated (GloVe's text format)") from None
    if not out:
        raise ValueError(f"{path}: no word vectors in it")
    return out


def default_embeddings(root):
    """The dataset's own word vectors: the synthetic data's embeddings.txt, else ds003020's
    English1000."""
    paths = [os.path.join(root, "derivative", f) for f in ("embeddings.txt", "english1000sm.hf5")]
    for p in paths:
        if os.path.isfile(p):
            return p
    raise ValueError(f"no word vectors in {root}: neither {paths[0]} nor {paths[1]} (python "
                     "fetch.py ds003020 gets the second; or pass --embeddings PATH)")


@torch.inference_mode()
def segment_features(extractor, wave, segments, context=4.0, batch=32):
    """Mean frame features (model.Extractor) over each (start, end) segment, heard with `context`
    s of audio before its end (BrainWavLM's 4 s windows); a longer segment is heard whole, alone:
    (segments, dim)."""
    spans = [max(context, end - start) for start, end in segments]  # seconds each window holds
    short = [k for k, s in enumerate(spans) if s == context]
    out = [None] * len(segments)
    groups = [short[i:i + batch] for i in range(0, len(short), batch)]
    groups += [[k] for k, s in enumerate(spans) if s > context]
    for group in groups:
        span = spans[group[0]]
        n = round(span * data.SR)
        waves = []
        for k in group:
            e = round(segments[k][1] * data.SR)
            w = torch.from_numpy(np.array(wave[max(e - n, 0):min(e, len(wave))]))
            waves.append(torch.nn.functional.pad(w, (n - len(w), 0)))
        device = next(extractor.parameters()).device
        h = extractor.hidden(torch.stack(waves).to(device)).float().cpu()  # (batch, frames, dim)
        for j, k in enumerate(group):
            length = segments[k][1] - segments[k][0]
            first = min(int((span - length) * h.shape[1] / span), h.shape[1] - 1)
            out[k] = h[j, first:].mean(0)
    return torch.stack(out)


def probe(run, kind, embeddings=None):
    """semantic: word vectors from features at each word (ridge, folds by story), mean r over the
    vector's dimensions on the test story. phones: phone identity, a linear (ridge) classifier on
    one-hot targets, accuracy on the test story. Pretrained against tuned backbone (run: an
    eval.Run)."""
    args = run.args
    subj = data.find_subject(args.data, run.subjects[0])
    stories = data.splits(args.data, subj, args.test_stories, args.val_stories,
                          args.train_stories)
    train_s, val_s, test_s = (stories[k] for k in ("train", "val", "test"))
    emb = None
    if kind == "semantic":
        emb = load_embeddings(embeddings or default_embeddings(args.data))
    items = {}  # story -> (segments, labels)
    for s in train_s + val_s + test_s:
        grid = data.textgrid_path(args.data, s)
        if kind == "semantic":
            segs = [w for w in textgrid.read_words(grid) if w[2].lower() in emb]
        else:
            segs = textgrid.read_phones(grid)
        items[s] = ([(a, b) for a, b, _ in segs], [lab.lower() for _, _, lab in segs])
    labels = sorted({lab for _, labs in items.values() for lab in labs})
    if kind == "semantic":
        target = {s: torch.as_tensor(np.stack([emb[w] for w in labs]))
                  for s, (_, labs) in items.items()}
    else:
        target = {s: torch.nn.functional.one_hot(torch.tensor([labels.index(x) for x in labs]),
                                                 len(labels)).float()
                  for s, (_, labs) in items.items()}
    fit_s = train_s + val_s
    audio = data.load_audio(args.data, list(items))
    out = {}
    for name, ex in (("pretrained", run.pretrained), ("tuned", run.tuned)):
        if ex is None:
            continue
        X = {s: segment_features(ex, audio[s], items[s][0]) for s in items}
        Xtr = torch.cat([X[s] for s in fit_s])
        mu, sd = ridge.moments(Xtr)
        groups = ridge.story_folds([len(X[s]) for s in fit_s], run.settings.folds)
        Y = torch.cat([target[s] for s in fit_s])
        Wp = ridge.fit_ridge((Xtr - mu) / sd, Y, run.settings.alphas, groups).W
        pred = torch.cat([(X[s] - mu) / sd @ Wp for s in test_s])
        truth = torch.cat([target[s] for s in test_s])
        if kind == "semantic":
            out[name] = float(ridge.pearson(pred, truth).mean())
        else:
            out[name] = float((pred.argmax(1) == truth.argmax(1)).float().mean())
    cache.merge_analyses(run.folder, f"probe_{kind}", out)
    metric = "mean r" if kind == "semantic" else "accuracy"
    return out, "\n".join(f"{kind} probe {metric}: {k} {v:.4f}" for k, v in out.items())


def mel_features(windows, history, n_mels=32):
    """Low-level features per fMRI frame: log mel band energies of its window, pooled in TR bins
    like the backbone's frames: (rows, history * n_mels)."""
    fb = AF.melscale_fbanks(201, 20.0, data.SR / 2, n_mels, data.SR)
    out = []
    for wave, *_ in torch.utils.data.DataLoader(windows, batch_size=64):
        spec = torch.stft(wave, 400, 320, window=torch.hann_window(400), return_complex=True)
        spec = spec.abs() ** 2
        mel = torch.log(1e-6 + (spec.transpose(1, 2) @ fb))  # (batch, frames, n_mels)
        out.append(pool_frames(mel, history).flatten(1))
    return torch.cat(out)


def lowlevel_r(X, L, Ytrain, Ytest, groups, alphas):
    """Test r of encoding models on features X and on X with the part that the low-level features L
    predict removed (least squares from L to X, fit on training rows). X, L: {"train", "test"}
    z-scored."""
    # least squares, not cross-validated ridge: a shrunken fit would leave part of what L explains
    # in X; a tiny ridge (1e-6 of L's scale) only keeps the solve stable
    G = L["train"].T @ L["train"]
    stable = 1e-6 * G.diagonal().mean() * torch.eye(len(G))
    B = torch.linalg.solve(G + stable, L["train"].T @ X["train"])
    out = []
    for F_ in (X, {k: X[k] - L[k] @ B for k in X}):
        W = ridge.fit_ridge(F_["train"], Ytrain, alphas, groups).W
        out.append(ridge.pearson(F_["test"] @ W, Ytest))
    return out


def lowlevel(run):
    """Moussa et al.'s test of reliance on low-level features: encoding r refit on the backbone's
    features after removing what mel band energies predict, per voxel set, pretrained vs tuned
    (run: an eval.Run)."""
    args = run.args
    d = run.subject(run.subjects[0])
    L = {s: mel_features(d.windows[s], args.history) for s in ("train", "test")}
    mu, sd = ridge.moments(L["train"])
    L = {s: (v - mu) / sd for s, v in L.items()}
    groups = ridge.story_folds([len(e) for e in d.windows["train"].ends], run.settings.folds)
    # the voxel sets by stage-1 cross-validated r on training stories: the same for both backbones,
    # and not chosen by the test r they report
    sets_ = ridge.sets(d, run.stage1_cv())
    res, table = {"sets": {k: v.tolist() for k, v in sets_.items()}}, []
    for name, ex in (("pretrained", run.pretrained), ("tuned", run.tuned)):
        if ex is None:
            continue
        X = run.features(ex, d)
        m, s_ = ridge.moments(X["train"])
        X = {k: (v - m) / s_ for k, v in X.items()}
        full, residual = lowlevel_r(X, L, d.Y["train"], d.Y["test"][:, :], groups,
                                    run.settings.alphas)
        r = dict(full=full, residual=residual)
        r = {k: np.where(d.good, v.numpy(), np.nan) for k, v in r.items()}
        res[name] = {k: {"full_r": float(np.nanmean(r["full"][v])),
                         "residual_r": float(np.nanmean(r["residual"][v]))}
                     for k, v in sets_.items()}
        res[name + "_voxel_r"] = {k: v.tolist() for k, v in r.items()}
        for k, v in res[name].items():
            table.append(f"{name:>10} {k:>10} full r {v['full_r']:.4f}  without low-level "
                         f"{v['residual_r']:.4f}  loss {v['full_r'] - v['residual_r']:+.4f}")
    saved = {k: v for k, v in res.items() if k in ("pretrained", "tuned")}
    cache.merge_analyses(run.folder, "lowlevel", saved)
    return res, "\n".join(table)


# -----------------------------------------------------------------------------
# the layer profile

def profile(run, layers):
    """The layer-wise encoding profile: for each layer, its features pooled into the run's TR
    bins, ridge refit on the run's training stories (stage 1's folds and lambdas), the test r of
    each voxel set (chosen by stage-1 cv r); pretrained, and tuned on layers 1..L, those that were
    tuned (above L the tuned model's weights are the pretrained ones). One forward per window and
    backbone yields every layer, each cached, then loaded one at a time. run: an eval.Run;
    layers: 1-based layer numbers."""
    args, layer = run.args, run.pretrained.layer
    d = run.subject(run.subjects[0])
    sets = ridge.sets(d, run.stage1_cv())
    out = {str(x): {} for x in layers}
    for name, ex in (("pretrained", run.pretrained), ("tuned", run.tuned)):
        chosen = [x for x in layers if name == "pretrained" or x <= layer] if ex else []
        at = [Extractor(args.model, ex.backbone, x, ex.normalize, pool=ex.pool)
              for x in chosen] if ex else []
        for s in ("train", "test") if chosen else ():
            window_features(every_layer(at, args.history), d.windows[s],
                            [e.key() for e in at], run.device, batch_size=args.infer_batch,
                            desc=f"{name} layers, {s}", precision=args.precision)
        for x, e in zip(chosen, at):
            r = ridge.fit_encoding(run.features(e, d), d, run.settings, run.device).test_r.numpy()
            out[str(x)][name] = {k: float(np.nanmean(r[v])) for k, v in sets.items()}
    cache.merge_analyses(run.folder, "layers", out)
    lines = [f"{'layer':>5} {'set':>12} {'pretrained':>10} {'tuned':>8} {'change':>8}"]
    for x, row in out.items():
        for k, base in row["pretrained"].items():
            t = row.get("tuned", {}).get(k)
            both = f"{t:8.4f} {t - base:+8.4f}" if t is not None else f"{'-':>8} {'-':>8}"
            lines.append(f"{x:>5} {k:>12} {base:10.4f} " + both)
    if run.tuned is not None and max(layers) > layer:
        lines.append(f"(the tuned profile stops at layer {layer}, the last that was tuned)")
    return out, "\n".join(lines)


def every_layer(extractors, history):
    """(batch, samples) -> [(batch, history * dim)], one per extractor: the layers of one backbone
    from one forward."""
    first, top = extractors[0], max(e.layer for e in extractors)

    def fn(wave):
        if first.normalize:
            wave = F.layer_norm(wave, wave.shape[-1:])
        hs = first.backbone.extract_features(wave, num_layers=top)[0]
        return [hs[e.layer - 1].mean(1) if e.pool == "mean" else
                pool_frames(hs[e.layer - 1], history).flatten(1) for e in extractors]
    return fn
