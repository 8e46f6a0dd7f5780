"""
Brain-tuning: fine-tune a self-supervised speech model so that it predicts fMRI responses.

Stage 1: the frozen backbone turns every delayed-TR window into features, ridge regression with a
per-voxel lambda maps them to every voxel; that is the baseline and the head's initialisation.
Stage 2: LoRA adapters (or the whole transformer) and the head train together; then the tuned
backbone's features are re-extracted and ridge refit, the field's protocol (REFERENCE section 6).

    python train.py --subject S01 --roi all            # synthetic dataset, tiny model, ~2 min on CPU
    python train.py --data ds003020 --subject UTS01 --recipe brainwavlm
    torchrun --nproc_per_node 2 train.py ...           # data parallel, one process per device
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from torchaudio.models import wav2vec2_model, wavlm_model
from tqdm import tqdm

import data
import lora

BUNDLES = {"wav2vec2_base": "WAV2VEC2_BASE", "wav2vec2_large": "WAV2VEC2_LARGE", "hubert_base": "HUBERT_BASE",
           "hubert_large": "HUBERT_LARGE", "wavlm_base": "WAVLM_BASE", "wavlm_base_plus": "WAVLM_BASE_PLUS",
           "wavlm_large": "WAVLM_LARGE"}
TINY = dict(  # a small WavLM: the real classes, but 40 ms frames (stride 640, not 320) for a fast laptop demo
    extractor_mode="group_norm", extractor_conv_layer_config=[(32, 40, 20), (32, 4, 4), (32, 2, 2), (32, 2, 2), (32, 2, 2)],
    extractor_conv_bias=False, encoder_embed_dim=64, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4, encoder_num_layers=4, encoder_num_heads=4, encoder_num_buckets=32,
    encoder_max_distance=128, encoder_attention_dropout=0.0, encoder_ff_interm_features=128,
    encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
    aux_num_out=None)
RECIPES = {  # REFERENCE section 1; every value can still be overridden on the command line
    # the laptop demo (the default with the tiny model): a small random model needs larger steps
    "demo": dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="qkvo", lr=1e-2, head_lr=1e-4,
                 epochs=8, patience=8),
    "li2024": dict(model="wav2vec2_base", layer="weighted", history=6, lora_rank=0, loss="mse", l2=1e-4,
                   lr=1e-5, head_lr=1e-4),
    "moussa2025": dict(model="hubert_base", layer="12", history=5, lora_rank=0, loss="mse", l2=0.0, lr=5e-5,
                       head_lr=1e-4, batch_size=128, epochs=30, warmup=5, val_stories="stagefright"),
    "brainwavlm": dict(model="wavlm_base_plus", layer="9", history=4, lora_rank=4, lora_alpha=4.0,
                       lora_dropout=0.1, lora_targets="qkv", loss="corr", lr=1e-4, head_lr=1e-4, epochs=20,
                       bottleneck=100, val_stories="fromboyhoodtofatherhood,onapproachtopluto"),
}


# -----------------------------------------------------------------------------
# the backbone

def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


def load_backbone(name, weights=None, seed=0):
    """A plain torchaudio Wav2Vec2Model and whether the bundle layer-normalises its input wave."""
    if name != "tiny" and name not in BUNDLES:
        raise ValueError(f"unknown model {name!r}; choose tiny or one of {', '.join(BUNDLES)}")
    torch.manual_seed(seed)
    if name == "tiny":
        model, normalize = wavlm_model(**TINY), False
    else:
        bundle = getattr(torchaudio.pipelines, BUNDLES[name])
        build = wavlm_model if bundle._model_type == "WavLM" else wav2vec2_model
        model, normalize = build(**dict(bundle._params, encoder_layer_drop=0.0)), bundle._normalize_waveform
        if weights is None:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            try:
                weights = bundle._get_state_dict(None)  # from the cache, or downloaded into it once
            except Exception as e:
                raise ValueError(f"cannot get the {name} weights: {bundle._path} is not in {cache} and the download "
                                 f"failed ({type(e).__name__}); fetch it elsewhere and pass --weights PATH") from None
    if weights is not None:
        state = load_checkpoint(weights) if isinstance(weights, str) else weights
        try:
            model.load_state_dict(state)
        except (RuntimeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0 if len(str(e).splitlines()) < 2 else 1].strip()
            raise ValueError(f"{weights if isinstance(weights, str) else name}: the weights do not fit the {name} "
                             f"architecture ({first})") from None
    return model.eval(), normalize


def hidden(backbone, wave, layer, layer_weights=None, normalize=False):
    """(batch, samples) -> (batch, frames, dim): transformer layer `layer` (1-based; layers above it
    are not computed), or the softmax-weighted sum of all layers (Li et al.)."""
    if normalize:
        wave = F.layer_norm(wave, wave.shape[-1:])
    if layer_weights is None:
        return backbone.extract_features(wave, num_layers=layer)[0][-1]
    layers = torch.stack(backbone.extract_features(wave)[0])  # (layers, batch, frames, dim)
    return torch.einsum("l,lbfd->bfd", layer_weights.softmax(0), layers)


def pooled(backbone, wave, layer, history, layer_weights=None, normalize=False):
    """(batch, samples) -> (batch, history * dim): frames averaged in TR bins, bin k = the audio
    heard k..k+1 TRs before the fMRI frame."""
    return data.pool_frames(hidden(backbone, wave, layer, layer_weights, normalize), history).flatten(1)


class BrainModel(nn.Module):
    """wave -> backbone -> TR bins -> z-score (training statistics) -> head -> voxels."""

    def __init__(self, backbone, head, mu, sd, layer, history, n_layers=0, normalize=False):
        super().__init__()
        self.backbone, self.head, self.layer, self.history, self.normalize = backbone, head, layer, history, normalize
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)
        self.layer_weights = nn.Parameter(torch.zeros(n_layers)) if n_layers else None  # uniform at start

    def features(self, wave):  # (batch, samples) -> (batch, history * dim)
        x = pooled(self.backbone, wave, self.layer, self.history, self.layer_weights, self.normalize)
        return (x - self.mu) / self.sd

    def forward(self, wave):  # (batch, samples) -> (batch, voxels)
        return self.head(self.features(wave))


@torch.inference_mode()
def extract(fn, windows, batch_size, device, desc="features"):
    """fn(wave (batch, samples)) -> (batch, p), over every window in order: (n, p) float32 on CPU."""
    out = []
    loader = torch.utils.data.DataLoader(windows, batch_size=batch_size)
    for wave, *_ in tqdm(loader, desc=desc, disable=not sys.stderr.isatty(), leave=False):
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            out.append(fn(wave.to(device)).float().cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# ridge regression and correlation

def pearson(a, b):
    """Per-column Pearson r of (n, v) tensors; a constant column gives 0, not NaN."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)


def fit_ridge(X, Y, alphas, groups, voxel_batch=16384, return_cv=False):
    """Ridge ||XW - Y||^2 + lambda ||W||^2 with its own lambda per voxel, chosen by cross-validation.

    X (n, p), Y (n, v); alphas are lambdas (the Huth lab's bootstrap_ridge squares its alpha: its
    alpha a is lambda = a**2 here); groups (n,) fold labels, each held out once (whole stories).
    Each voxel takes the lambda with the best mean held-out r (ties: the larger lambda), then W is
    refit on all rows. No intercept: inputs are z-scored. Returns W (p, v), best lambdas (v,)
    and, with return_cv, each voxel's cross-validated r at its lambda (v,)."""
    assert X.ndim == 2 and Y.ndim == 2 and len(X) == len(Y) == len(groups), "X, Y, groups must align"
    alphas = torch.as_tensor(sorted(alphas), dtype=X.dtype, device=X.device)
    groups = torch.as_tensor(groups, device=X.device)
    folds = groups.unique()
    assert len(folds) >= 2, "cross-validation needs at least two groups"
    scores = torch.zeros(len(alphas), Y.shape[1], dtype=X.dtype, device=X.device)
    for g in folds:
        test = groups == g
        U, s, Vh = torch.linalg.svd(X[~test], full_matrices=False)  # (n_tr, k), (k,), (k, p)
        XV = X[test] @ Vh.T  # (n_te, k)
        D = s / (s ** 2 + alphas[:, None])  # (alphas, k)
        for j in range(0, Y.shape[1], voxel_batch):
            UtY, Yte = U.T @ Y[~test, j:j + voxel_batch], Y[test, j:j + voxel_batch]  # (k, vb), (n_te, vb)
            for a in range(len(alphas)):
                scores[a, j:j + voxel_batch] += pearson(XV @ (D[a, :, None] * UtY), Yte)
    scores /= len(folds)
    best = len(alphas) - 1 - scores.flip(0).argmax(0)  # argmax takes the first max: flipped, the largest lambda
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    D = s / (s ** 2 + alphas[:, None])
    W = torch.empty(X.shape[1], Y.shape[1], dtype=X.dtype, device=X.device)
    for j in range(0, Y.shape[1], voxel_batch):
        UtY, b = U.T @ Y[:, j:j + voxel_batch], best[j:j + voxel_batch]
        for a in b.unique():
            cols = torch.nonzero(b == a).squeeze(1)
            W[:, j + cols] = Vh.T @ (D[a, :, None] * UtY[:, cols])
    cv = scores.gather(0, best[None]).squeeze(0)
    return (W, alphas[best], cv) if return_cv else (W, alphas[best])


def story_folds(lengths, k):
    """Fold label per row: story i (of the given row counts) goes to fold i mod k, whole."""
    return np.concatenate([np.full(n, i % k) for i, n in enumerate(lengths)])


def layer_of(args, n_layers):
    """The transformer layer read (1-based): --layer, or 3/4 of the depth; all of them if weighted."""
    return n_layers if args.layer == "weighted" else int(args.layer or round(0.75 * n_layers))


def make_head(W, bottleneck=0):
    """Linear(p -> v) holding the ridge weights W (p, v); with a bottleneck K, two Linears through K
    units holding the best rank-K approximation of W (Eckart-Young), split evenly by sqrt(s)."""
    p, v = W.shape
    if not bottleneck:
        head = nn.Linear(p, v)
        head.weight.data, head.bias.data = W.T.contiguous(), torch.zeros(v)
        return head
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(bottleneck, len(s))
    down, up = nn.Linear(p, k, bias=False), nn.Linear(k, v)
    down.weight.data = (U[:, :k] * s[:k].sqrt()).T.contiguous()
    up.weight.data, up.bias.data = (Vh[:k].T * s[:k].sqrt()).contiguous(), torch.zeros(v)
    return nn.Sequential(down, up)


# -----------------------------------------------------------------------------
# the run

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a broken file behind."""
    tmp = path + ".tmp"
    if path.endswith(".json") or path.endswith(".jsonl"):
        with open(tmp, "w") as f:
            f.write(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def prepare(args, subject):
    """Everything one subject's run needs from the dataset."""
    subj = data.find_subject(args.data, subject)
    train, val, test = data.splits(args.data, subj, args.test_stories, args.val_stories)
    resp, good = data.load_responses(args.data, subj, train + val + test)
    waves = data.load_audio(args.data, train + val + test)
    kw = dict(history=args.history, tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start)
    d = dict(subject=subj, stories=dict(train=train, val=val, test=test), good=good,
             rois=data.roi_sets(args.data, subj, len(good)), ceiling=None)
    for split, stories in d["stories"].items():
        d[split] = data.Windows(waves, resp, stories, **kw)
        d["Y" + split] = torch.cat([torch.as_tensor(resp[s]) for s in stories])  # (rows, voxels)
    path = os.path.join(args.data, "derivative", "preprocessed_data", subj, test[0] + ".hf5")
    if len(test) == 1:
        try:
            d["ceiling"] = data.noise_ceiling(data.read_hf5(path, "individual_repeats"))
        except ValueError:
            pass  # no repeats: no noise ceiling
    return d


def stage1(args, fn, d, device):
    """Frozen features -> per-voxel ridge. Returns feature statistics, W (p, voxels), cv r, test r."""
    X = {s: extract(fn, d[s], args.batch_size, device, f"stage 1 {s}") for s in ("train", "test")}
    mu, sd = X["train"].mean(0), X["train"].std(0).clamp_min(1e-6)
    good = torch.as_tensor(d["good"])
    groups = story_folds([len(e) for e in d["train"].ends], args.cv_folds)
    W = torch.zeros(len(mu), len(good))
    cv = torch.full((len(good),), float("nan"))
    t0 = time.time()
    Wg, alphas, cvg = fit_ridge(((X["train"] - mu) / sd).to(device), d["Ytrain"][:, good].to(device),
                                args.alphas, groups, return_cv=True)
    W[:, good], cv[good] = Wg.cpu(), cvg.cpu()
    edge = ((alphas == min(args.alphas)) | (alphas == max(args.alphas))).float().cpu()
    fit = cvg.cpu() > 0.1  # unresponsive voxels rightly take the largest lambda
    log(f"ridge: {good.sum()} voxels in {time.time() - t0:.1f} s; at an edge of the lambda grid: "
        f"{100 * edge.mean():.1f}% of voxels, {100 * edge[fit].mean() if fit.any() else 0:.1f}% of those with cv r > 0.1")
    r = torch.full((len(good),), float("nan"))
    r[good] = pearson((X["test"] - mu) / sd @ W[:, good], d["Ytest"][:, good])
    return mu, sd, W, cv, r


def sets(args, d, cv):
    """The voxel sets the results are reported on: all, each ROI of the subject, the top N."""
    good = np.flatnonzero(d["good"])
    n_top = int(args.roi[3:]) if args.roi.startswith("top") else max(1, len(good) // 10)
    top = good[np.argsort(-cv.numpy()[good], kind="stable")[:n_top]]
    return {"all": good, **{k: np.intersect1d(v, good) for k, v in d["rois"].items()}, f"top{n_top}": top}


def results_table(res, sets_, ceiling):
    """Means over each set, and a table for stdout."""
    out, lines = {}, [f"{'set':>12} {'voxels':>7} {'baseline r':>11} {'tuned r':>8} {'refit r':>8} {'change':>8}"]
    for name, idx in sets_.items():
        row = {"n_voxels": int(len(idx))}
        for key in ("baseline_r", "tuned_r", "refit_r"):
            if key in res:
                v = res[key][idx]
                row[key] = float(np.nanmean(v)) if np.isfinite(v).any() else None
                if ceiling is not None and key != "tuned_r":
                    ok = idx[np.isfinite(ceiling[idx])]
                    row[key + "_norm"] = float(np.nanmean(res[key][ok] / ceiling[ok])) if len(ok) else None
        out[name] = row
        fmt = lambda x: f"{x:8.4f}" if x is not None else f"{'-':>8}"
        change = (f"{100 * (row['refit_r'] - row['baseline_r']) / abs(row['baseline_r']):+7.1f}%"
                  if row.get("refit_r") is not None and row["baseline_r"] else f"{'-':>8}")
        lines.append(f"{name:>12} {len(idx):7d} {row['baseline_r']:11.4f} {fmt(row.get('tuned_r'))} "
                     f"{fmt(row.get('refit_r'))} {change}")
    return out, "\n".join(lines)


RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))


def log(msg):
    if RANK == 0:
        print(msg, flush=True)


def loss_fn(pred, y, kind):
    """mse, or corr: minus the correlation across voxels of each TR, averaged (BrainWavLM)."""
    if kind == "mse":
        return F.mse_loss(pred, y)
    return -pearson(pred.T, y.T).mean()


def train_stage2(args, model, d, roi, run, device, ckpt=None):
    """LoRA (or the transformer) and the head, trained together; the best epoch by validation r."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith("head.")], "lr": args.lr},
              {"params": [p for n, p in trainable if n.startswith("head.")], "lr": args.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = -(-len(d["train"]) // (args.batch_size * args.accum))  # optimiser steps per epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup * steps)))
    net = model
    if WORLD > 1:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.lora_rank == 0)
    state = dict(epoch=0, best_val=-float("inf"), bad_epochs=0, metrics=[],
                 best={n: p.detach().clone() for n, p in trainable})
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        model.load_state_dict(ckpt["trainable"], strict=False)
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
    Yroi = {s: d["Y" + s][:, roi] for s in ("train", "val")}
    for epoch in range(state["epoch"], args.epochs):
        if state["bad_epochs"] >= args.patience:
            break
        t0, model_losses = time.time(), []
        net.train()
        perm = torch.randperm(len(d["train"]), generator=torch.Generator().manual_seed(args.seed + epoch))
        B = args.batch_size
        bar = tqdm(range(0, len(perm), B), desc=f"epoch {epoch + 1}", disable=RANK or not sys.stderr.isatty())
        for i, start in enumerate(bar):
            idx = perm[start:start + B][RANK::WORLD]  # this process's share of the global batch
            wave = torch.stack([d["train"][j][0] for j in idx.tolist()]).to(device)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(net(wave).float(), Yroi["train"][idx].to(device), args.loss)
            if args.l2:
                loss = loss + args.l2 * sum(p.square().sum() for n, p in model.head.named_parameters()
                                            if n.endswith("weight"))
            if not torch.isfinite(loss):
                raise ValueError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; stopped, and "
                                 f"the last good checkpoint in {run} is kept (try a lower --lr)")
            (loss / args.accum).backward()
            if (i + 1) % args.accum == 0 or start + B >= len(perm):
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            model_losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}", win_s=f"{(start + B) / (time.time() - t0):.1f}")
        model.eval()
        pred = extract(model, d["val"], args.batch_size, device, "validation")
        val_r = pearson(pred, Yroi["val"]).nanmean().item()
        state["metrics"].append(dict(epoch=epoch + 1, train_loss=float(np.mean(model_losses)), val_r=val_r,
                                     lr=opt.param_groups[0]["lr"], head_lr=opt.param_groups[1]["lr"],
                                     seconds=round(time.time() - t0, 2)))
        if val_r > state["best_val"]:
            state["best_val"], state["bad_epochs"] = val_r, 0
            state["best"] = {n: p.detach().clone() for n, p in trainable}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        log(f"epoch {epoch + 1}: train loss {np.mean(model_losses):.4f}, validation r {val_r:.4f}, "
            f"{time.time() - t0:.1f} s")
        if RANK == 0:
            ckpt = dict(opt=opt.state_dict(), sched=sched.state_dict(), rng=torch.get_rng_state(), state=state,
                        trainable={n: p.detach().clone() for n, p in trainable})
            save_atomic(ckpt, os.path.join(run, "checkpoint.pt"))
            save_atomic("".join(json.dumps(m) + "\n" for m in state["metrics"]), os.path.join(run, "metrics.jsonl"))
    model.load_state_dict(state["best"], strict=False)
    return state


# -----------------------------------------------------------------------------
# the command line

def parser():
    p = argparse.ArgumentParser(description="Brain-tuning of a speech model on fMRI responses to stories.")
    a = p.add_argument
    a("--subject", default="S01", help="subject, e.g. S01 or UTS01")
    a("--roi", default="all", help="voxels to train on: all, an ROI name, a .npy file, or topN (stage-1 cv r)")
    a("--data", default=None, help="dataset folder (ds003020 layout); default: the synthetic one, made if absent")
    a("--recipe", choices=sorted(RECIPES), help="set the defaults to one paper's recipe (see README)")
    a("--model", default=None, help=f"tiny or {', '.join(BUNDLES)}; default tiny on synthetic data, "
                                    "wavlm_base_plus on a real dataset")
    a("--weights", default=None, help="local state dict for --model instead of the torchaudio download")
    a("--layer", default=None, help="transformer layer read (1-based; default 3/4 of the depth, 9 of 12) "
                                    "or 'weighted' (learned weighted sum of all layers, Li et al.)")
    a("--history", type=int, default=6, help="TRs of audio before each fMRI frame (Li et al.: 6)")
    a("--tr", type=float, default=data.TR, help="seconds per fMRI frame")
    a("--trim-start", type=int, default=data.TRIM_START, help="TRs dropped at the start of each run")
    a("--sound-start", type=float, default=data.SOUND_START, help="seconds from run start to audio start")
    a("--test-stories", default=None, help="comma-separated test stories (default: wheretheressmoke)")
    a("--val-stories", default=None, help="comma-separated validation stories (default: one training story)")
    a("--cv-folds", type=int, default=5, help="ridge cross-validation folds, each a group of whole stories")
    a("--alphas", default="1e-1,1e8,19", help="ridge lambda grid: first,last,count (log-spaced)")
    a("--bottleneck", type=int, default=0, help="head through K units, initialised by rank-K ridge weights")
    a("--lora-rank", type=int, default=4, help="LoRA rank (BrainWavLM: 4); 0 = tune the whole transformer")
    a("--lora-alpha", type=float, default=4.0, help="LoRA alpha; scaling = alpha / rank (BrainWavLM: 4)")
    a("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input (BrainWavLM: 0.1)")
    a("--lora-targets", default="qkv", help="projections to adapt, letters of qkvo (BrainWavLM: qkv)")
    a("--loss", choices=["mse", "corr"], default="mse", help="mse (Li et al.) or corr (BrainWavLM)")
    a("--l2", type=float, default=0.0, help="L2 penalty on the head's weights (Li et al.)")
    a("--lr", type=float, default=1e-4, help="learning rate of the adapters (or the transformer)")
    a("--head-lr", type=float, default=1e-4, help="learning rate of the head")
    a("--warmup", type=float, default=1.0, help="epochs of linear learning-rate warm-up")
    a("--clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--batch-size", type=int, default=16, help="windows per optimiser step (global, across processes)")
    a("--accum", type=int, default=1, help="batches accumulated per optimiser step")
    a("--epochs", type=int, default=20, help="stage-2 epochs; 0 stops after stage 1 (the baseline)")
    a("--patience", type=int, default=3, help="stop after this many epochs without a better validation r")
    a("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda when available")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default=None, help="run folder (default runs/<subject>_<roi>_<model>_<time>)")
    a("--resume", default=None, help="continue the run in this folder from its last finished epoch")
    a("--force", action="store_true", help="overwrite an existing run folder")
    return p


def parse(argv=None):
    p = parser()
    first = p.parse_args(argv)
    if first.resume:
        cfg = os.path.join(first.resume, "config.json")
        if not os.path.isfile(cfg):
            raise ValueError(f"{cfg}: no such file; --resume takes the folder of an earlier run")
        with open(cfg) as f:
            args = argparse.Namespace(**json.load(f)["args"])
        args.resume, args.force = first.resume, False
        return args
    if first.recipe is None and (first.model == "tiny" or (first.model is None and first.data is None)):
        first.recipe = "demo"
    if first.recipe:
        p.set_defaults(**RECIPES[first.recipe], recipe=first.recipe)
    args = p.parse_args(argv)
    args.synthetic = args.data is None
    if args.synthetic:
        args.data = os.path.join(os.environ.get("BRAINTUNE_CACHE", ".cache"), "synthetic")
    args.model = args.model or ("tiny" if args.synthetic else "wavlm_base_plus")
    for k in ("test_stories", "val_stories"):
        setattr(args, k, getattr(args, k).split(",") if isinstance(getattr(args, k), str) else getattr(args, k))
    lo, hi, n = args.alphas.split(",")
    args.alphas = np.logspace(np.log10(float(lo)), np.log10(float(hi)), int(n)).tolist()
    for flag, ok in (("--history", args.history >= 1), ("--batch-size", args.batch_size >= WORLD),
                     ("--accum", args.accum >= 1), ("--epochs", args.epochs >= 0), ("--cv-folds", args.cv_folds >= 2),
                     ("--lora-rank", args.lora_rank >= 0), ("--lora-targets", set(args.lora_targets) <= set("qkvo"))):
        if not ok:
            raise ValueError(f"{flag}: invalid value")
    return args


def run_folder(args):
    if args.resume:
        return args.resume
    name = args.out or os.path.join("runs", f"{args.subject}_{args.roi}_{args.model}_{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(name) and os.listdir(name) and not args.force:
        raise ValueError(f"{name} already exists; use --resume {name} to continue it or --force to overwrite it")
    os.makedirs(name, exist_ok=True)
    return name


def main(argv=None):
    args = parse(argv)
    if WORLD > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.synthetic and not os.path.isdir(args.data) and RANK == 0:
        log(f"making the synthetic dataset in {args.data} (once)")
        data.make_demo(args.data + ".tmp")
        os.replace(args.data + ".tmp", args.data)
    if WORLD > 1:
        torch.distributed.barrier()
    d = prepare(args, args.subject)
    backbone, normalize = load_backbone(args.model, args.weights, args.seed)
    n_layers = len(backbone.encoder.transformer.layers)
    weighted = args.layer == "weighted"
    layer = layer_of(args, n_layers)
    if not 1 <= layer <= n_layers:
        raise ValueError(f"--layer {layer}: {args.model} has layers 1..{n_layers}")
    backbone.to(device)
    run = [run_folder(args) if RANK == 0 else None]
    if WORLD > 1:
        torch.distributed.broadcast_object_list(run)  # every process needs the folder's name
    run = run[0]
    log(f"{d['subject']}: model {args.model} (recipe {args.recipe or 'none'}), layer {args.layer if weighted else layer}, {len(d['train'])} training "
        f"windows of {args.history} TRs from {len(d['stories']['train'])} stories; run folder {run}")
    if RANK == 0 and not args.resume:
        cfg = dict(args=vars(args), stories=d["stories"], torch=torch.__version__, torchaudio=torchaudio.__version__,
                   numpy=np.__version__)
        save_atomic(json.dumps(cfg, indent=1), os.path.join(run, "config.json"))
    lw = torch.zeros(n_layers, device=device) if weighted else None
    stage1_path = os.path.join(run, "stage1.pt")
    if args.resume and os.path.exists(stage1_path):
        mu, sd, W, cv, base_r = load_checkpoint(stage1_path)
    else:
        mu, sd, W, cv, base_r = stage1(args, lambda w: pooled(backbone, w, layer, args.history, lw, normalize), d, device)
        if RANK == 0:
            save_atomic((mu, sd, W, cv, base_r), stage1_path)
    sets_ = sets(args, d, cv)
    roi = sets_[args.roi] if args.roi.startswith("top") else np.intersect1d(
        data.load_roi(args.data, d["subject"], args.roi, len(d["good"])), sets_["all"])
    res = {"baseline_r": base_r.numpy()}
    if args.epochs > 0:
        lora.add_lora(backbone, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, range(layer))
        if args.lora_rank == 0 and not weighted:  # layers above the one read get no gradient
            backbone.encoder.transformer.layers[layer:].requires_grad_(False)
        model = BrainModel(backbone, make_head(W[:, roi], args.bottleneck), mu, sd, layer, args.history,
                           n_layers if weighted else 0, normalize).to(device)
        ckpt = load_checkpoint(os.path.join(run, "checkpoint.pt")) if args.resume and os.path.exists(
            os.path.join(run, "checkpoint.pt")) else None
        state = train_stage2(args, model, d, roi, run, device, ckpt)
        model.eval()
        tuned = torch.full((len(d["good"]),), float("nan"))
        tuned[roi] = pearson(extract(model, d["test"], args.batch_size, device, "test"), d["Ytest"][:, roi])
        fn = lambda w: pooled(model.backbone, w, layer, args.history, model.layer_weights, normalize)
        refit = stage1(args, fn, d, device)[4]
        res.update(tuned_r=tuned.numpy(), refit_r=refit.numpy())
        if RANK == 0:
            save_atomic(dict(trainable=state["best"], args=vars(args)), os.path.join(run, "adapter.pt"))
    if RANK == 0:
        test, table = results_table(res, sets_, d["ceiling"])
        out = dict(subject=d["subject"], model=args.model, roi=args.roi, n_voxels=int(len(roi)), test=test)
        save_atomic(json.dumps(out, indent=1), os.path.join(run, "results.json"))
        np.savez(os.path.join(run, "voxel_r.npz"), **res)
        print(table)
    return run


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
