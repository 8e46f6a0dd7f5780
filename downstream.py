"""
Downstream speech tasks: does brain-tuning make a better speech model? Moussa et al. 2025's probe
(docs/evaluation.md): the frozen backbone's hidden states mean-pooled over each clip at each
layer, one linear layer per layer trained on the task's training split, its weight decay and epochs
chosen on the validation split (never the test split), then scored on the test split with bootstrap
intervals, and the paired difference tuned - pretrained over the same resampled test clips. The
tasks (tasks.TASKS) are read by tasks.py, each from the folder a user downloads.

    result, table = evaluate("speechcommands", root, {"pretrained": pre, "tuned": tuned},
                             model_name="wavlm_base_plus", normalize=True, layers=[2, 5, 9])
"""
import functools
import glob
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

import ridge
from cache import cache_root, cached, digest, file_key, progress
from model import feature_key
from tasks import read_sphere_or_wav, read_task


# -----------------------------------------------------------------------------
# each clip's layers, mean-pooled, and their cache

def _min_samples(backbone):  # the fewest samples from which the CNN front end makes one frame
    n = 1
    for block in reversed(backbone.feature_extractor.conv_layers):
        n = (n - 1) * block.conv.stride[0] + block.conv.kernel_size[0]
    return n


@torch.inference_mode()
def pooled_layers(backbone, waves, layers, normalize=False):
    """[(samples,) of any lengths] -> {layer: (clips, dim)}: each clip's hidden states at `layers`
    (1-based) averaged over its own frames, one forward for every layer. Clips of equal length go
    through the CNN together (its group norm spans the whole clip, so padding there would change
    it); the frames are then zero-padded and the padding is masked as torchaudio does with lengths
    (zeroed before the positional convolution, no attention key), so a clip pools the same in any
    batch. torchaudio's WavLM refuses lengths, so the layers are run here."""
    device = next(backbone.parameters()).device
    frames = [None] * len(waves)
    for n in sorted({len(w) for w in waves}):
        idx = [i for i, w in enumerate(waves) if len(w) == n]
        x = torch.stack([waves[i] for i in idx]).to(device)  # (group, samples)
        x = F.layer_norm(x, x.shape[-1:]) if normalize else x
        for i, f in zip(idx, backbone.feature_extractor(x, None)[0]):  # f (frames, channels)
            frames[i] = f
    lengths = torch.tensor([len(f) for f in frames], device=device)  # (clips,)
    pad = torch.arange(max(lengths), device=device)[None] >= lengths[:, None]  # (clips, frames)
    enc, padded = backbone.encoder, bool(pad.any())
    x = enc.feature_projection(nn.utils.rnn.pad_sequence(frames, batch_first=True))
    x = enc.transformer._preprocess(x.masked_fill(pad[..., None], 0.0))  # (clips, frames, dim)
    wavlm = isinstance(enc.transformer.layers[0].attention, WavLMSelfAttention)
    mask = None if wavlm else (-10000.0 * pad[:, None, None, :].to(x.dtype)).expand(
        -1, 1, x.shape[1], -1)  # wav2vec2 and HuBERT: an additive mask (batch, 1, frames, frames)
    keys = torch.zeros(pad.shape, dtype=x.dtype, device=device).masked_fill(pad, -torch.inf)
    keys = keys if wavlm else None  # WavLM: an additive key padding mask (clips, frames)
    mean = (~pad)[..., None].to(x.dtype) / lengths[:, None, None]  # (clips, frames, 1)
    out, bias = {}, None
    for i, layer in enumerate(enc.transformer.layers[:max(layers)], 1):
        x, bias = layer(x, mask if padded else None, position_bias=bias,
                        key_padding_mask=keys if padded else None)
        if i in layers:
            out[i] = (x * mean).sum(1)
    return out


def clip_features(backbone, clips, key, layers, *, normalize, batch_size, name):
    """{layer: (clips, dim) float32, memory-mapped}: pooled_layers of every clip, cached one entry
    per layer under key (backbone, task, split, files) and the layer. Every missing layer is filled
    by one pass over the clips (batches of similar file size, hence length) written into .npy
    memory maps in a folder of the cache, so that private memory stays one batch whatever the
    task's size (Speech Commands: 105k clips x 12 layers x 768 = 3.9 GB); the cache copies each
    from disk and the folder is removed."""
    got = {layer: cached("downstream", dict(key, layer=layer), None, f"{name}-{layer}")
           for layer in layers}
    missing = [layer for layer in layers if got[layer] is None]
    if not missing:
        return {layer: got[layer]["x"] for layer in layers}
    folder = os.path.join(cache_root(), "downstream")
    os.makedirs(folder, exist_ok=True)
    for old in glob.glob(os.path.join(folder, "build-*-*")):  # a killed run's memory maps (GBs)
        try:
            os.kill(int(os.path.basename(old).split("-")[1]), 0)  # signal 0: is it still running?
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError):
            pass
    tmp = tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=folder)
    try:
        dim = backbone.encoder.transformer.pos_conv_embed.embed_dim
        shortest = _min_samples(backbone)
        out = {layer: np.lib.format.open_memmap(os.path.join(tmp, f"{layer}.npy"), "w+",
                                                np.float32, (len(clips), dim)) for layer in missing}
        order = sorted(range(len(clips)), key=[os.path.getsize(c.path) for c in clips].__getitem__)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in progress(batches, f"{name} features"):
            waves = [read_sphere_or_wav(clips[i].path) for i in batch]
            short = next((i for i, w in zip(batch, waves) if len(w) < shortest), None)
            if short is not None:
                raise ValueError(f"{clips[short].path}: too short for one frame of the model "
                                 f"(expected at least {shortest} samples at 16 kHz)")
            pooled = pooled_layers(backbone, waves, missing, normalize)
            for layer in missing:
                out[layer][batch] = pooled[layer].float().cpu().numpy()
        for layer in missing:
            build = functools.partial(dict, x=out[layer])
            got[layer] = cached("downstream", dict(key, layer=layer), build, f"{name}-{layer}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {layer: got[layer]["x"] for layer in layers}


# -----------------------------------------------------------------------------
# the probes, and their metrics with bootstrap intervals

@dataclass
class Fit:
    weight_decay: float  # chosen on the validation split
    epochs: int  # chosen on the validation split
    valid: float  # the validation metric (accuracy, or micro-F1) at that choice
    probs: np.ndarray  # (test clips, classes) the chosen probe's test probabilities
    history: list  # [{"weight_decay", "epochs", "valid"}]: every setting tried


def _targets(clips, n_classes, multilabel):  # (clips, classes) bool
    y = np.zeros((len(clips), n_classes), bool)
    for i, c in enumerate(clips):
        y[i, c.label] = True
    return y


def _f1(sums, n_classes):
    """sums (rows, 3 * classes): true positives, truths, predictions per class -> micro-F1 (with
    one truth and one prediction per clip, the accuracy) and macro-F1 over the classes that are
    true or predicted at least once, each (rows,)."""
    tp, t, p = sums[:, :n_classes], sums[:, n_classes:2 * n_classes], sums[:, 2 * n_classes:]
    seen = t + p > 0
    micro = 2 * tp.sum(1) / np.maximum(t.sum(1) + p.sum(1), 1)
    macro = np.where(seen, 2 * tp / np.maximum(t + p, 1), 0).sum(1) / np.maximum(seen.sum(1), 1)
    return micro, macro


def fit_probe(x, y, multilabel, *, weight_decays=(0.0, 1e-4, 1e-2), epochs=300, every=10, seed=0,
              device=torch.device("cpu")):
    """One nn.Linear on x {split: (clips, dim)} to y {split: (clips, classes) bool}, z-scored with
    the training split's statistics: Adam lr 1e-3, full batch, cross-entropy (binary cross-entropy
    for a multi-label task); for each weight decay, the validation metric every `every` epochs up
    to `epochs`; the setting with the best one (the first, on ties) gives the test probabilities."""
    X = {s: torch.as_tensor(np.asarray(v, np.float32), device=device) for s, v in x.items()}
    mu, sd = ridge.moments(X["train"])
    X = {s: (v - mu) / sd for s, v in X.items()}  # (clips, dim) each
    Y = {s: torch.as_tensor(v, device=device).float() if multilabel else
         torch.as_tensor(v.argmax(1), device=device) for s, v in y.items()}
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    best, history = None, []
    for wd in weight_decays:
        torch.manual_seed(seed)
        probe = nn.Linear(X["train"].shape[1], y["train"].shape[1]).to(device)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=wd)
        for epoch in range(1, epochs + 1):
            loss = loss_fn(probe(X["train"]), Y["train"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch % every == 0:
                with torch.no_grad():
                    pred = _decide(_probs(probe(X["valid"]), multilabel), multilabel)
                sums = np.concatenate([pred & y["valid"], y["valid"], pred], 1).sum(0)[None]
                micro, _ = _f1(sums, pred.shape[1])  # (1,)
                history.append(dict(weight_decay=wd, epochs=epoch, valid=float(micro[0])))
                if best is None or history[-1]["valid"] > best["valid"]:
                    state = {k: v.clone() for k, v in probe.state_dict().items()}
                    best = dict(history[-1], state=state)
    assert best is not None, f"no validation after {epochs} epochs (every {every})"
    probe.load_state_dict(best["state"])
    with torch.no_grad():
        probs = _probs(probe(X["test"]), multilabel)
    return Fit(best["weight_decay"], best["epochs"], best["valid"], probs, history)


def _decide(probs, multilabel):  # (clips, classes) probabilities -> (clips, classes) bool
    if multilabel:
        return probs > 0.5
    return np.eye(probs.shape[1], dtype=bool)[probs.argmax(1)]


def _probs(logits, multilabel):  # (clips, classes) logits -> numpy probabilities
    return (logits.sigmoid() if multilabel else logits.softmax(1)).cpu().numpy()


def metric_names(multilabel):
    return ("micro_f1", "macro_f1") if multilabel else ("accuracy", "macro_f1")


def bootstrap_metrics(truth, preds, multilabel, *, resamples=1000, seed=0):
    """truth (clips, classes) bool; preds {backbone: (clips, classes) bool}, in order. Each metric
    on the test clips, with its 95% percentile interval over `resamples` resamplings of the clips
    with replacement (idx = default_rng(seed).integers(0, clips, (resamples, clips))); with two
    backbones also "difference" (second - first), over the same resampled clips."""
    n, k = truth.shape
    idx = np.random.default_rng(seed).integers(0, n, (resamples, n), dtype=np.int32)
    w = np.stack([np.ones(n, np.int64)] + [np.bincount(r, minlength=n) for r in idx])
    w = w.astype(np.float32)  # (1 + resamples, clips): row 0 the test set itself
    scores = {}
    for name, p in preds.items():
        sums = w @ np.concatenate([truth & p, truth, p], 1).astype(np.float32)
        scores[name] = dict(zip(metric_names(multilabel), _f1(sums, k)))  # {metric: (1 + R,)}
    out = {name: {m: _interval(v) for m, v in s.items()} for name, s in scores.items()}
    if len(scores) == 2:
        a, b = scores.values()
        out["difference"] = {m: _interval(b[m] - a[m]) for m in a}
    return out


def _interval(v):  # v (1 + resamples,): the value and its 95% interval
    lo, hi = np.percentile(v[1:], [2.5, 97.5])
    return {"value": float(v[0]), "ci": [float(lo), float(hi)]}


# -----------------------------------------------------------------------------
# the entry: a task, two backbones, every layer

def evaluate(task, root, backbones, *, model_name, normalize, layers=None, limit=None,
             batch_size=16, device=torch.device("cpu"), seed=0, epochs=300, every=10,
             weight_decays=(0.0, 1e-4, 1e-2)):
    """The probe of `task` (TASKS) read from root at each of `layers` (1-based; None: every layer)
    of backbones {"pretrained": module, "tuned": module or None}: features cached, a probe per layer
    and backbone, test metrics with 95% intervals and the paired difference tuned - pretrained.
    Returns (result: JSON-ready dict, table: str)."""
    assert set(backbones) <= {"pretrained", "tuned"}, f"backbones {list(backbones)}"
    nets = {k: backbones[k] for k in ("pretrained", "tuned") if backbones.get(k) is not None}
    assert nets, "no backbone to evaluate"
    t = read_task(task, root, limit, seed)
    depth = min(len(net.encoder.transformer.layers) for net in nets.values())
    layers = sorted(set(layers or range(1, depth + 1)))
    if not all(1 <= layer <= depth for layer in layers):
        raise ValueError(f"--downstream-layers {','.join(map(str, layers))}: expected layers "
                         f"from 1..{depth} of {model_name}")
    y = {s: _targets(c, len(t.classes), t.multilabel) for s, c in t.splits.items()}
    files = {s: digest([file_key(c.path) for c in clips]) for s, clips in t.splits.items()}
    feats = {}  # backbone -> split -> layer -> (clips, dim)
    for name, net in nets.items():
        net.to(device).eval()
        key = dict(feature_key(model_name, net, None, None, normalize), task=t.name, limit=limit,
                   seed=seed, pooling="mean")
        feats[name] = {s: clip_features(net, clips, dict(key, split=s, files=files[s]), layers,
                                        normalize=normalize, batch_size=batch_size,
                                        name=f"{t.name}-{s}-{name}")
                       for s, clips in t.splits.items()}
    result = dict(task=t.name, classes=t.classes, multilabel=t.multilabel, resamples=1000,
                  clips={s: len(c) for s, c in t.splits.items()}, layers={})
    for layer in progress(layers, f"{t.name} probes"):
        fits = {name: fit_probe({s: f[layer] for s, f in feats[name].items()}, y, t.multilabel,
                                weight_decays=weight_decays, epochs=epochs, every=every,
                                seed=seed, device=device) for name in nets}
        preds = {name: _decide(f.probs, t.multilabel) for name, f in fits.items()}
        entry = bootstrap_metrics(y["test"], preds, t.multilabel, seed=seed)
        for name, f in fits.items():
            entry[name]["choice"] = dict(weight_decay=f.weight_decay, epochs=f.epochs,
                                         valid=f.valid)
        result["layers"][str(layer)] = entry
    return result, format_downstream(result)


def _cell(c, sign=""):  # "0.812 [0.801, 0.823]"
    return f"{c['value']:{sign}.3f} [{c['ci'][0]:{sign}.3f}, {c['ci'][1]:{sign}.3f}]"


def format_downstream(result):
    """The table: layer, metric, pretrained, tuned, difference [95% interval]."""
    first = result["layers"][next(iter(result["layers"]))]
    names = [n for n in ("pretrained", "tuned", "difference") if n in first]
    head = {"pretrained": "pretrained", "tuned": "tuned", "difference": "tuned - pretrained"}
    lines = [f"{result['task']}: linear probe on mean-pooled layers, test split "
             f"({result['clips']['test']} clips; 95% intervals, {result['resamples']} resamples)",
             (f"{'layer':>5}  {'metric':<9}" + "".join(f"  {head[n]:<23}" for n in names)).rstrip()]
    for layer, entry in result["layers"].items():
        for m in metric_names(result["multilabel"]):
            cells = [_cell(entry[n][m], "+" if n == "difference" else "") for n in names]
            lines.append(f"{layer:>5}  {m:<9}" + "".join(f"  {c:<23}" for c in cells).rstrip())
    return "\n".join(lines)


def plot_downstream(result, task, path):
    """Each metric by layer, pretrained against tuned, with their 95% intervals, saved to path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(result["layers"], key=int)
    metrics = metric_names(result["multilabel"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for name in (n for n in ("pretrained", "tuned") if n in result["layers"][layers[0]]):
            cells = [result["layers"][layer][name][m] for layer in layers]
            v = np.array([c["value"] for c in cells])
            err = np.abs(np.array([c["ci"] for c in cells]).T - v)  # (2, layers)
            ax.errorbar([int(x) for x in layers], v, yerr=err, marker="o", capsize=3, label=name)
        ax.set(xlabel="transformer layer", ylabel=m.replace("_", "-"), title=f"{task}: {m}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit("downstream.py has no command of its own: run `python eval.py RUN --downstream TASK "
             "--downstream-data PATH`, or `python tasks.py words DATA OUT` for the stories' words")
