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
import contextlib
import ctypes
import functools
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

import data
import eval as analyses  # the results table and its statistics live with the analyses (eval imports train)
import lora
from model import (BUNDLES, TINY, BrainModel, feature_key, frame_hop, hidden, load_backbone, load_checkpoint, make_head,
                   pooled, pretrain_tiny)

RECIPES = {  # REFERENCE section 1; every value can still be overridden on the command line
    # the laptop demo (the default with the tiny model): a small model needs larger steps
    "demo": dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="qkvo", lr=1e-2, head_lr=1e-4,
                 epochs=8, patience=8),
    "li2024": dict(model="wav2vec2_base", layer="weighted", history=6, lora_rank=0, loss="mse", l2=1e-4,
                   lr=1e-5, head_lr=1e-4),
    "moussa2025": dict(model="hubert_base", layer="12", history=5, lora_rank=0, loss="mse", l2=0.0, lr=5e-5,
                       head_lr=1e-4, batch_size=128, epochs=30, warmup=5, val_stories="stagefright",
                       protocol="moussa2025"),
    "brainwavlm": dict(model="wavlm_base_plus", layer="9", history=4, lora_rank=4, lora_alpha=4.0,
                       lora_dropout=0.1, lora_targets="qkv", loss="corr", lr=1e-4, head_lr=1e-4, epochs=20,
                       bottleneck=100, val_stories="fromboyhoodtofatherhood,stagefright", protocol="brainwavlm"),
}


def tiny_pretrained(args, windows, max_steps=300):
    """tiny's phone-pretrained weights for the training stories of `windows` (pretrain_tiny), cached."""
    grids = [data.textgrid_path(args.data, s) for s in windows.stories]  # there: check() saw them
    t0 = time.time()

    def build():
        state, accuracy = pretrain_tiny(args.data, dict(zip(windows.stories, windows.waves)), args.tiny_pretrain,
                                        args.seed, max_steps=max_steps)
        return {"state": state, "accuracy": accuracy}
    key = dict(audio=windows.keys, textgrids=[data.file_key(p) for p in grids], epochs=args.tiny_pretrain,
               seed=args.seed, max_steps=max_steps, tiny=TINY, torch=torch.__version__)
    e = data.cached("tiny", key, build, "tiny")
    log(f"tiny pretrained to name phones: {args.tiny_pretrain} epochs, frame accuracy {e['accuracy']:.2f}, "
        f"{time.time() - t0:.0f} s")
    return e["state"]


# -----------------------------------------------------------------------------
# ridge regression and correlation

def pearson(a, b):
    """Per-column Pearson r of (n, v) tensors; a constant column gives 0, not NaN."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)


def full_float32(fn):
    """fn with TF32 off for CUDA matmuls, whatever the rest of the run uses: a 10-bit mantissa would
    move the lambdas that cross-validation chooses and the weights."""
    @functools.wraps(fn)
    def wrapped(*a, **k):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return fn(*a, **k)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return wrapped


@full_float32
def fit_ridge(X, Y, alphas, groups, voxel_batch=None, return_cv=False):
    """Ridge ||XW - Y||^2 + lambda ||W||^2 with its own lambda per voxel, chosen by cross-validation.

    X (n, p) on the device that does the work; Y (n, v) a tensor or a data.Responses, read one batch
    of voxels at a time (about 256 MB), each sent to X's device in turn. alphas are lambdas (the Huth
    lab's bootstrap_ridge squares its alpha: its alpha a is lambda = a**2 here); groups (n,) fold
    labels, each held out once (whole stories). Each voxel takes the lambda with the best mean
    held-out r (ties: the larger lambda), then W is refit on all rows. No intercept: inputs are
    z-scored. Returns W (p, v), best lambdas (v,) and, with return_cv, each voxel's cross-validated r
    at its lambda (v,), on the CPU.

    Each fold's training Gram matrix X'X = V diag(e) V' (float64) gives every lambda's weights as
    V B with B = diag(1 / (e + lambda)) V'X'Y. The held-out r needs no prediction: with Xc the
    fold's centred rows in V's basis, cov = sum(B * Xc'Y) and var = ||Xc B||^2."""
    assert X.ndim == 2 and len(X) == Y.shape[0] == len(groups), "X, Y, groups must align"
    (n, p), dev, dt = X.shape, X.device, X.dtype
    alphas = torch.as_tensor(sorted(alphas), dtype=dt, device=dev)
    groups = torch.as_tensor(np.asarray(groups), device=dev)
    folds = [torch.nonzero(groups == g).squeeze(1) for g in groups.unique()]
    assert len(folds) >= 2, "cross-validation needs at least two groups"
    gram = lambda rows: X[rows].double().T @ X[rows].double()  # (p, p); float64, or eigh loses small e
    G = sum(gram(te) for te in folds)
    decs = []  # per fold: held-out rows, e, V, and Xc (held-out rows <= p) or Xc'Xc
    for te in data.progress(folds, "ridge folds"):
        e, V = torch.linalg.eigh(G - gram(te))
        Xc = (X[te] - X[te].mean(0)) @ V.to(dt)  # (n_te, p)
        decs.append((te, e.clamp_min(0).to(dt), V.to(dt), Xc if len(te) <= p else Xc.T @ Xc))
    e, V = torch.linalg.eigh(G)
    e, V = e.clamp_min(0).to(dt), V.to(dt)
    v = Y.shape[1]
    vb = voxel_batch or max(256, min(16384, 2 ** 26 // (n + (len(folds) + 5) * p)))  # about 256 MB a batch
    W, best, cv = torch.empty(p, v, dtype=dt), torch.empty(v, dtype=torch.long), torch.empty(v, dtype=dt)
    for j in data.progress(range(0, v, vb), f"ridge, {v} voxels", total=-(-v // vb)):
        Yb = torch.as_tensor(Y[:, j:j + vb]).to(dev, dt)  # (n, vb)
        XY = [X[te].T @ Yb[te] for te, *_ in decs]  # (p, vb): each fold's X'Y
        XtY = sum(XY)
        scores = torch.zeros(len(alphas), Yb.shape[1], dtype=dt, device=dev)
        for (te, e_, V_, S), xy in zip(decs, XY):
            Yte, small = Yb[te], len(te) <= p
            A = V_.T @ (XtY - xy)  # (p, vb): V'X'Y over the fold's training rows
            Z = S.T @ Yte if small else V_.T @ (xy - X[te].sum(0)[:, None] * Yte.mean(0))  # (p, vb): Xc'Y
            inv = 1 / (e_[None] + alphas[:, None])  # (alphas, p)
            cov = inv @ (A * Z)  # (alphas, vb)
            var = torch.stack([((S @ B).square() if small else B * (S @ B)).sum(0) for B in (A * i[:, None] for i in inv)])
            scores += cov / (var.clamp_min(0) * (Yte - Yte.mean(0)).square().sum(0)).sqrt().clamp_min(1e-12)
        b = len(alphas) - 1 - scores.flip(0).argmax(0)  # argmax takes the first max: flipped, the largest lambda
        W[:, j:j + vb] = (V @ ((V.T @ XtY) / (e[:, None] + alphas[b]))).cpu()
        best[j:j + vb], cv[j:j + vb] = b.cpu(), scores.gather(0, b[None])[0].cpu() / len(folds)
    return (W, alphas.cpu()[best], cv) if return_cv else (W, alphas.cpu()[best])


def story_folds(lengths, k):
    """Fold label per row: story i (of the given row counts) goes to fold i mod k, whole."""
    return np.concatenate([np.full(n, i % k) for i, n in enumerate(lengths)])


def layer_of(args, n_layers):
    """The transformer layer read (1-based): --layer, or 3/4 of the depth; all of them if weighted."""
    return n_layers if args.layer == "weighted" else int(args.layer or round(0.75 * n_layers))


# -----------------------------------------------------------------------------
# the run

def keep_freed_memory():
    """glibc gives each large freed tensor back to the OS, so every training step page-faults its
    activations in anew; on CPU, keep freed memory for reuse instead (bench.py: a wavlm_base step
    about 15% faster). Linux/glibc only; elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: the heap's free top is not given back


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a broken file behind."""
    tmp = path + ".tmp"
    if path.endswith(".json") or path.endswith(".jsonl"):
        with open(tmp, "w") as f:
            f.write(obj)
    elif path.endswith(".npz"):
        with open(tmp, "wb") as f:
            np.savez(f, **obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def prepare(args, subjects):
    """Every subject's data and the windows they share (data.prepare)."""
    return data.prepare(args.data, subjects, args.test_stories, args.val_stories, history=args.history,
                        tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start)


def scored_rows(d, skip):
    """The test rows a score counts: each test story's from row `skip` on (the papers drop 40)."""
    return np.concatenate([np.arange(s + skip, s + len(e)) for s, e in zip(d["Ytest"].starts, d["test"].ends)])


def stage1(args, X, d, device, stats=None, skip=0):
    """Frozen features X {"train", "test"} (rows, p) of one subject -> per-voxel ridge. The features
    are z-scored by stats (mu, sd), by default the training rows' own. Returns mu, sd, W (p, voxels),
    cv r, test r (NaN for unusable voxels) and the test story's block sums (eval.block_sums), both
    from each test story's row `skip` on. The fit is cached under all that it depends on (the
    features themselves, the responses' files, lambdas, folds), so a second run does not redo it."""
    mu, sd = stats or (X["train"].mean(0), X["train"].std(0).clamp_min(1e-6))
    Z = {s: (x - mu) / sd for s, x in X.items()}
    groups = story_folds([len(e) for e in d["train"].ends], args.cv_folds)
    lengths, scored = [len(e) - skip for e in d["test"].ends], scored_rows(d, skip)
    fitted = []

    def fit():
        t0 = time.time()
        fitted.append(t0)
        W, lambdas, cv = fit_ridge(Z["train"].to(device), d["Ytrain"], args.alphas, groups, return_cv=True)
        r, sums = [], []  # test r, and each block of test TRs' sums for the bootstrap (eval.block_sums)
        for j in range(0, W.shape[1], 16384):
            pred, y = Z["test"][scored] @ W[:, j:j + 16384], d["Ytest"][scored, j:j + 16384]
            r.append(pearson(pred, y))
            sums.append(analyses.block_sums(pred, y, lengths, args.block))
        r, rows = torch.cat(r), sums[0][1]
        good = torch.as_tensor(d["good"])
        edge = ((lambdas == min(args.alphas)) | (lambdas == max(args.alphas)))[good].float()
        fit = cv[good] > 0.1  # unresponsive voxels rightly take the largest lambda
        log(f"{d['subject']} ridge: {good.sum()} voxels in {time.time() - t0:.1f} s; at an edge of the lambda grid: "
            f"{100 * edge.mean():.1f}% of voxels, {100 * edge[fit].mean() if fit.any() else 0:.1f}% of those with cv r > 0.1")
        cv[~good], r[~good] = float("nan"), float("nan")
        return {"W": W.numpy(), "cv": cv.numpy(), "r": r.numpy(), "sums": torch.cat([s for s, _ in sums], -1).numpy(),
                "rows": rows.numpy()}
    key = dict(X=Z, Y=[d["Y" + s].keys for s in ("train", "test")], good=d["good"], alphas=args.alphas,
               groups=groups, block=args.block, skip=skip, device=device.type, v=1)
    e = data.cached("stage1", key, fit, d["subject"]) if d["Ytrain"].keys else fit()
    if not fitted:
        log(f"{d['subject']} ridge: read from the cache (the same features, responses and settings as an earlier run)")
    W, cv, r, sums, rows = (torch.from_numpy(np.asarray(e[k])) for k in ("W", "cv", "r", "sums", "rows"))
    return mu, sd, W, cv, r, (sums, rows)


def sets(args, d, cv):
    """The voxel sets the results are reported on: all, each ROI of the subject, the top N."""
    good = np.flatnonzero(d["good"])
    n_top = int(args.roi[3:]) if args.roi.startswith("top") else max(1, len(good) // 10)
    top = good[np.argsort(-cv.numpy()[good], kind="stable")[:n_top]]
    return {"all": good, **{k: np.intersect1d(v, good) for k, v in d["rois"].items()}, f"top{n_top}": top}


RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
STEP = ["starting"]  # what the run is doing, for an error that cannot be foreseen (out of memory)


def log(msg):
    if RANK == 0:
        print(msg, flush=True)


def loss_fn(pred, y, kind):
    """mse, or corr: minus the correlation across voxels of each TR, averaged (BrainWavLM)."""
    if kind == "mse":
        return F.mse_loss(pred, y)
    return -pearson(pred.T, y.T).mean()


def heads_r(model, Z, ds, split, device, block=16384, skip=0):
    """Each subject's r over its trained voxels, from z-scored features Z (shared windows, p); the
    predictions and responses are taken a block of voxels at a time; on the test split, from each
    story's row `skip` on."""
    out = []
    with torch.no_grad():
        for head, d in zip(model.heads, ds):
            *first, last = head if isinstance(head, nn.Sequential) else [head]  # a bottleneck: down, up
            rows = scored_rows(d, skip) if split == "test" else slice(None)
            h = Z[d["take_" + split]][rows].to(device)
            for m in first:
                h = m(h)
            out.append(torch.cat([pearson(F.linear(h, last.weight[j:j + block], last.bias[j:j + block]).float().cpu(),
                                          d["Y" + split][rows, d["roi"][j:j + block]]) for j in range(0, len(d["roi"]), block)]))
    return out


def train_stage2(args, model, ds, shared, run, device, ckpt=None):
    """LoRA (or the transformer) and every subject's head, trained together; the best epoch by
    validation r (the mean over subjects)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith("heads.")], "lr": args.lr},
              {"params": [p for n, p in trainable if n.startswith("heads.")], "lr": args.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = -(-len(shared["train"]) // (args.batch_size * args.accum))  # optimiser steps per epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup * steps)))
    net = model
    if WORLD > 1:  # a subject with no window in a batch leaves its head unused
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.lora_rank == 0 or len(ds) > 1)
    state = dict(epoch=0, best_val=-float("inf"), bad_epochs=0, metrics=[],
                 best={n: p.detach().clone() for n, p in trainable})
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        model.load_state_dict(ckpt["trainable"], strict=False)
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
    for epoch in range(state["epoch"], args.epochs):
        if state["bad_epochs"] >= args.patience:
            break
        t0, model_losses, STEP[0] = time.time(), [], f"stage 2, epoch {epoch + 1}"
        net.train()
        perm = torch.randperm(len(shared["train"]), generator=torch.Generator().manual_seed(args.seed + epoch))
        B = args.batch_size
        if 0 < len(perm) % B < WORLD:  # a last batch smaller than the number of processes: left out this epoch
            perm = perm[:len(perm) - len(perm) % B]
        n = -(-len(perm) // B)  # batches this epoch
        note = lambda: f"loss {model_losses[-1]:.4f}, {len(model_losses) * B / (time.time() - t0):.1f} windows/s"
        for i, start in enumerate(data.progress(range(0, len(perm), B), f"epoch {epoch + 1}", note=note)):
            batch = perm[start:start + B]
            idx = batch[RANK::WORLD]  # this process's share of the global batch
            wave = torch.stack([shared["train"][j][0] for j in idx.tolist()]).to(device)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                preds = net(wave)  # every head on the one forward of the shared windows
            losses = []
            for k, (head, d) in enumerate(zip(model.heads, ds)):
                r = d["row_train"][idx]
                heard = r >= 0  # the windows of this batch that subject k heard
                if heard.any():
                    loss = loss_fn(preds[k][heard].float(), d["Ytrain"][r[heard], d["roi"]].to(device), args.loss)
                    if args.l2:
                        loss = loss + args.l2 * sum(p.square().sum() for n, p in head.named_parameters()
                                                    if n.endswith("weight"))
                    losses.append(loss)
            loss = torch.stack(losses).mean()  # each subject counts once, whatever its voxel count
            if not torch.isfinite(loss):
                raise ValueError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; stopped, and "
                                 f"the last good checkpoint in {run} is kept (try a lower --lr)")
            share = len(idx) * WORLD / len(batch)  # DDP averages the processes: weigh by the windows each had
            group = min(args.accum, n - i // args.accum * args.accum)  # an epoch's last group may be short
            (loss * share / group).backward()
            if (i + 1) % args.accum == 0 or start + B >= len(perm):
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            model_losses.append(loss.item())
        model.eval()
        Z = data.features(model.features, shared["val"], None, args.batch_size, device, "validation")
        val = [r.nanmean().item() for r in heads_r(model, Z, ds, "val", device)]
        val_r = float(np.mean(val))
        state["metrics"].append(dict(epoch=epoch + 1, train_loss=float(np.mean(model_losses)), val_r=val_r,
                                     lr=opt.param_groups[0]["lr"], head_lr=opt.param_groups[1]["lr"],
                                     seconds=round(time.time() - t0, 2)))
        if len(ds) > 1:
            state["metrics"][-1]["val_r_subjects"] = {d["subject"]: v for d, v in zip(ds, val)}
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
    a("--subject", default="S01", help="subject, e.g. S01 or UTS01; several, comma-separated (S01,S02,S03), "
                                       "tune one backbone with a head for each")
    a("--roi", default="all", help="voxels to train on: all, an ROI name, a .npy file, or topN (stage-1 cv r)")
    a("--data", default=None, help="dataset folder (ds003020 layout); default: the synthetic one, made if absent")
    a("--recipe", choices=sorted(RECIPES), help="set the defaults to one paper's recipe (see README)")
    a("--model", default=None, help=f"tiny or {', '.join(BUNDLES)}; default tiny on synthetic data, "
                                    "wavlm_base_plus on a real dataset")
    a("--weights", default=None, help="local state dict for --model instead of the torchaudio download")
    a("--tiny-pretrain", type=int, default=4, help="epochs of tiny's phone pretraining on the training stories "
                                                   "(its stand-in for self-supervised pretraining); 0: random")
    a("--layer", default=None, help="transformer layer read (1-based; default 3/4 of the depth, 9 of 12) "
                                    "or 'weighted' (learned weighted sum of all layers, Li et al.)")
    a("--history", type=int, default=6, help="TRs of audio before each fMRI frame (Li et al.: 6)")
    a("--tr", type=float, default=data.TR, help="seconds per fMRI frame")
    a("--trim-start", type=int, default=data.TRIM_START, help="TRs dropped at the start of each run")
    a("--sound-start", type=float, default=data.SOUND_START, help="seconds from run start to audio start")
    a("--test-stories", default=None, help="comma-separated test stories (default: wheretheressmoke)")
    a("--val-stories", default=None, help="comma-separated validation stories (default: one training story)")
    a("--protocol", choices=sorted(data.PROTOCOLS), default="windows", help="the features that stage 1's baseline, "
      "the refit and eval.py's fits are scored with: windows (the training input) or a paper's (moussa2025, "
      "brainwavlm: a sliding context, Lanczos to the TRs, delays 1-4)")
    a("--context", type=float, default=None, help="seconds heard before each stride (moussa2025 16, brainwavlm 3.75)")
    a("--stride", type=float, default=None, help="seconds between the ends of the feature windows (0.1, 0.25)")
    a("--delays", default=None, help="TR delays of the protocol's features, comma-separated (the papers: 1,2,3,4)")
    a("--test-skip", type=int, default=None, help="rows left out of each test story's score at its start "
                                                 "(the papers: 40; windows: 0)")
    a("--block", type=int, default=10, help="TRs per block of the test story's bootstrap (the change's interval)")
    a("--cv-folds", type=int, default=None, help="ridge cross-validation folds, each a group of whole stories "
                                                  "(default 5, or one per training story if there are fewer)")
    a("--alphas", default="1e-1,1e8,19", help="ridge lambda grid: first,last,count (log-spaced)")
    a("--bottleneck", type=int, default=0, help="head through K units, initialised by rank-K ridge weights")
    a("--lora-rank", type=int, default=4, help="LoRA rank (BrainWavLM: 4); 0 = tune the whole transformer")
    a("--lora-alpha", type=float, default=4.0, help="LoRA alpha; scaling = alpha / rank (BrainWavLM: 4)")
    a("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input (BrainWavLM: 0.1)")
    a("--lora-targets", default="qkv", help="projections to adapt, letters of qkvo (BrainWavLM: qkv)")
    a("--backbone-dropout", type=float, default=None, help="the backbone's own dropout (attention, hidden, "
      "projection) in stage 2; default the bundle's (0.1; tiny 0); 0 trains about 1.5x faster on CPU")
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
    a("--no-cache", action="store_true", help="keep nothing in $BRAINTUNE_CACHE (default .cache): responses, "
                                              "audio, features and stage-1 fits are made again and deleted at exit")
    return p


def parse(argv=None):
    """The flags, each checked alone and against the others (not yet against the dataset: check())."""
    p = parser()
    first = p.parse_args(argv)
    if first.resume:
        cfg = os.path.join(first.resume, "config.json")
        try:
            with open(cfg) as f:
                saved = json.load(f)["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--resume {first.resume}: {cfg} is not the config of a run ({type(e).__name__}); "
                             "--resume takes the folder of an earlier run") from None
        if not {"data", "subject", "model", "roi"} <= set(saved):
            raise ValueError(f"--resume {first.resume}: {cfg} lacks the run's data, subject, model or roi")
        args = argparse.Namespace(**dict(vars(p.parse_args([])), **saved))  # flags newer than the run: defaults
        args.resume, args.force = first.resume, False
        return args
    if first.recipe is None and (first.model == "tiny" or (first.model is None and first.data is None)):
        first.recipe = "demo"
    if first.recipe:
        p.set_defaults(**RECIPES[first.recipe], recipe=first.recipe)
    args = p.parse_args(argv)
    args.synthetic = args.data is None
    args.data = os.path.abspath(args.data or os.path.join(data.cache_root(), data.SYNTHETIC))  # works from anywhere
    args.model = args.model or ("tiny" if args.synthetic else "wavlm_base_plus")
    for k in ("test_stories", "val_stories"):
        setattr(args, k, getattr(args, k).split(",") if isinstance(getattr(args, k), str) else getattr(args, k))
    try:
        lo, hi, n = (float(x) for x in args.alphas.split(","))
        assert 0 < lo <= hi and n >= 1 and n == int(n)
    except (ValueError, AssertionError):
        raise ValueError(f"--alphas {args.alphas}: expected first,last,count with 0 < first <= last, e.g. 1e-1,1e8,19") from None
    args.alphas = np.logspace(np.log10(lo), np.log10(hi), int(n)).tolist()
    if args.model != "tiny" and args.model not in BUNDLES:
        raise ValueError(f"--model {args.model}: unknown; choose tiny or one of {', '.join(BUNDLES)}")
    depth = (TINY if args.model == "tiny" else getattr(torchaudio.pipelines, BUNDLES[args.model])._params)["encoder_num_layers"]
    if args.layer not in (None, "weighted") and not (args.layer.isdigit() and 1 <= int(args.layer) <= depth):
        raise ValueError(f"--layer {args.layer}: {args.model} has layers 1..{depth} (or 'weighted')")
    m = re.fullmatch(r"top(\d+)", args.roi)
    if args.roi.startswith("top") and not (m and int(m[1]) >= 1):
        raise ValueError(f"--roi {args.roi}: expected topN with a whole number N >= 1, all, an ROI name or a .npy file")
    if "," in args.subject and args.roi.endswith(".npy"):
        raise ValueError(f"--roi {args.roi}: a .npy file holds one subject's voxel indices; with several subjects "
                         "use all, topN or an ROI name found in each subject's ROI file")
    given = {k: getattr(args, k) for k in ("context", "stride", "delays", "test_skip") if getattr(args, k) is not None}
    if args.protocol == "windows" and set(given) - {"test_skip"}:
        raise ValueError(f"--{sorted(set(given) - {'test_skip'})[0]}: a setting of moussa2025 or brainwavlm, not of "
                         "--protocol windows")
    try:
        protocol = dict(data.PROTOCOLS[args.protocol], **given)
        protocol["delays"] = [int(x) for x in str(protocol["delays"]).strip("()[]").split(",") if x.strip()]
        assert all(x >= 0 for x in protocol["delays"]) and (protocol["delays"] or args.protocol == "windows")
    except (ValueError, AssertionError):
        raise ValueError(f"--delays {args.delays}: expected TR delays, comma-separated (e.g. 1,2,3,4)") from None
    args.context, args.stride, args.delays, args.test_skip = (protocol.get(k) for k in ("context", "stride", "delays",
                                                                                         "test_skip"))
    if args.weights and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights}: no such file")
    for flag, ok, want in (
            ("--history", args.history >= 1, "at least 1"), ("--tr", args.tr > 0, "positive"),
            ("--trim-start", args.trim_start >= 0, "0 or more"), ("--block", args.block >= 1, "at least 1"),
            ("--context", (args.context or 0) >= 0, "0 or more"), ("--stride", args.stride is None or args.stride > 0,
                                                                    "positive"), ("--test-skip", args.test_skip >= 0, "0 or more"), ("--cv-folds", (args.cv_folds or 2) >= 2, "at least 2"),
            ("--bottleneck", args.bottleneck >= 0, "0 (none) or more"), ("--lora-rank", args.lora_rank >= 0, "0 or more"),
            ("--lora-alpha", args.lora_alpha > 0, "positive"), ("--lora-dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
            ("--lora-targets", set(args.lora_targets) <= set("qkvo") and args.lora_targets, "letters of qkvo"),
            ("--backbone-dropout", args.backbone_dropout is None or 0 <= args.backbone_dropout < 1, "in [0, 1)"),
            ("--l2", args.l2 >= 0, "0 or more"), ("--lr", args.lr > 0, "positive"), ("--head-lr", args.head_lr > 0, "positive"),
            ("--warmup", args.warmup >= 0, "0 or more"), ("--clip", args.clip > 0, "positive"),
            ("--batch-size", args.batch_size >= WORLD, f"at least the number of processes, {WORLD}"),
            ("--accum", args.accum >= 1, "at least 1"), ("--epochs", args.epochs >= 0, "0 or more"),
            ("--patience", args.patience >= 1, "at least 1"), ("--tiny-pretrain", args.tiny_pretrain >= 0, "0 or more")):
        if not ok:
            raise ValueError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: must be {want}")
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a device; try cpu, cuda or cuda:1") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "use --device cpu")
    return args


def check(args):
    """The flags against the dataset, from listings and headers alone (data.check) and each subject's
    ROI file, before anything is loaded. Returns data.check's {subject: (voxels, splits)}."""
    found = data.check(args.data, args.subject.split(","), args.test_stories, args.val_stories, args.cv_folds,
                       tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start)
    n_train = min(len(train) for _, (_, (train, _, _)) in found.items())
    args.cv_folds = args.cv_folds or min(5, n_train)  # the default: 5 folds, or one per training story
    if args.cv_folds < 2:
        raise ValueError(f"{args.data}: ridge's cross-validation needs two training stories or more; there is one")
    for subj, (voxels, (train, _, test)) in found.items():
        for s in test:
            with data.open_hf5(data.response_path(args.data, subj, s)) as f:
                if f["data"].shape[0] <= (args.test_skip or 0):
                    raise ValueError(f"--test-skip {args.test_skip}: the test story {s!r} of {subj} has "
                                     f"{f['data'].shape[0]} rows")
        if args.roi.startswith("top") and int(args.roi[3:]) > voxels:
            raise ValueError(f"--roi {args.roi}: {subj} has {voxels} voxels")
        if not args.roi.startswith("top"):
            data.load_roi(args.data, subj, args.roi, voxels)
        if args.model == "tiny" and args.weights is None and args.tiny_pretrain > 0:
            for s in train:
                if not os.path.isfile(data.textgrid_path(args.data, s)):
                    raise ValueError(f"{data.textgrid_path(args.data, s)}: no such file; tiny's phone pretraining "
                                     "reads the training stories' TextGrids (--tiny-pretrain 0 uses random weights, "
                                     "--weights PATH your own)")
    return found


def run_folder(args):
    if args.resume:
        return args.resume
    name = args.out or os.path.join("runs", f"{args.subject.replace(',', '+')}_{args.roi}_{args.model}_{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(name) and (not os.path.isdir(name) or os.listdir(name)) and not args.force:
        raise ValueError(f"{name} already exists; use --resume {name} to continue it or --force to overwrite it")
    return name


def main(argv=None):
    args = parse(argv)
    with data.no_cache() if getattr(args, "no_cache", False) else contextlib.nullcontext():
        return brain_tune(args)


def brain_tune(args):
    """Both stages and the results, for the flags in args; returns the run folder."""
    if WORLD > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()
    if args.synthetic and not os.path.isdir(args.data) and RANK == 0:
        log(f"making the synthetic dataset in {args.data} (once)")
        data.make_demo(args.data + ".tmp")
        os.replace(args.data + ".tmp", args.data)
    run = [run_folder(args) if RANK == 0 else None]
    if WORLD > 1:
        torch.distributed.broadcast_object_list(run)  # every process needs the folder's name
    run = run[0]
    check(args)  # every mistake the flags and listings show, before any costly work
    pretraining = args.model == "tiny" and args.weights is None and args.tiny_pretrain > 0
    if not pretraining:  # a failed download or a bad --weights file, before the data are read
        backbone, normalize = load_backbone(args.model, args.weights, args.seed, args.backbone_dropout)
    if WORLD > 1 and RANK > 0:
        torch.distributed.barrier()  # rank 0 fills the caches (data, tiny, stage 1) first; the others read them
    STEP[0] = "loading the data"
    ds, shared = prepare(args, args.subject.split(","))
    for d in ds:
        if args.roi.startswith("top") and int(args.roi[3:]) > d["good"].sum():
            raise ValueError(f"--roi {args.roi}: {d['subject']} has {d['good'].sum()} usable voxels")
    if pretraining:
        STEP[0] = "tiny's pretraining"
        pretrained = tiny_pretrained(args, shared["train"])
        backbone, normalize = load_backbone(args.model, pretrained, args.seed, args.backbone_dropout)
    n_layers = len(backbone.encoder.transformer.layers)
    weighted = args.layer == "weighted"
    layer = layer_of(args, n_layers)
    backbone.to(device)
    if RANK == 0:
        os.makedirs(run, exist_ok=True)
    log(f"{'+'.join(d['subject'] for d in ds)}: model {args.model} (recipe {args.recipe or 'none'}), layer "
        f"{args.layer if weighted else layer}, {len(shared['train'])} training windows of {args.history} TRs from "
        f"{len(shared['train'].stories)} stories; run folder {run}")
    if pretraining:  # the run keeps its own copy; resume and eval.py load it from there
        args.weights = os.path.abspath(os.path.join(run, "tiny_pretrained.pt"))
        if RANK == 0:
            save_atomic(pretrained, args.weights)
    if RANK == 0 and not args.resume:
        cfg = dict(args=vars(args), stories={d["subject"]: d["stories"] for d in ds}, torch=torch.__version__,
                   torchaudio=torchaudio.__version__, numpy=np.__version__)
        save_atomic(json.dumps(cfg, indent=1), os.path.join(run, "config.json"))

    protocol = dict(context=args.context, stride=args.stride, delays=args.delays) if args.protocol != "windows" else None
    skip = args.test_skip or 0

    def features(bb, lw, protocol=None, splits=("train", "test")):  # each shared window or story forwarded once
        key = feature_key(args.model, bb, layer, lw, normalize)
        if protocol:  # a paper's: frames with their context, Lanczos to the rows, delays
            fn = lambda w: hidden(bb, w, layer, lw, normalize)
            X = {s: data.protocol_features(fn, frame_hop(bb), shared[s], key, protocol, args.batch_size, device, s)
                 for s in splits}
        else:
            fn = lambda w: pooled(bb, w, layer, args.history, lw, normalize)
            X = {s: data.features(fn, shared[s], key, args.batch_size, device, s) for s in splits}
        stats = X[splits[0]].mean(0), X[splits[0]].std(0).clamp_min(1e-6)  # one z-scoring for every head
        own = lambda x, take: x if len(take) == len(x) and bool((take == torch.arange(len(x))).all()) else x[take]
        return X, stats, [{s: own(X[s], d["take_" + s]) for s in X} for d in ds]  # no copy if it heard them all

    stage1_path = os.path.join(run, "stage1.pt")
    if args.resume and os.path.exists(stage1_path):
        mu, sd, fits, *scored = load_checkpoint(stage1_path)
    else:
        STEP[0] = "stage 1"
        lw0 = torch.zeros(n_layers, device=device) if weighted else None
        _, (mu, sd), X = features(backbone, lw0)  # the head's initialisation, topN, and the windows' baseline
        fits = [stage1(args, x, d, device, (mu, sd), skip)[2:] for x, d in zip(X, ds)]  # (W, cv, r, blocks) each
        scored = []  # the baseline under a paper's protocol
        if protocol:
            _, stats, X = features(backbone, lw0, protocol)
            scored = [[stage1(args, x, d, device, stats, skip)[2:] for x, d in zip(X, ds)]]
        if RANK == 0:
            save_atomic((mu, sd, fits, *scored), stage1_path)
    if WORLD > 1 and RANK == 0:
        torch.distributed.barrier()
    for d, (W, cv, *_), (_, _, r, *blocks) in zip(ds, fits, scored[0] if scored else fits):
        d["sets"], d["blocks"] = sets(args, d, cv), {"baseline": blocks[0]} if blocks else {}  # none: an older run
        d["roi"] = d["sets"][args.roi] if args.roi.startswith("top") else np.intersect1d(
            data.load_roi(args.data, d["subject"], args.roi, len(d["good"])), d["sets"]["all"])
        d["res"] = {"baseline_r": r.numpy()}
    if args.epochs > 0:
        torch.manual_seed(args.seed)  # the adapters' init must not depend on what the caches spared (DataLoaders draw seeds)
        lora.add_lora(backbone, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, range(layer))
        if args.lora_rank == 0 and not weighted:  # layers above the one read get no gradient
            backbone.encoder.transformer.layers[layer:].requires_grad_(False)
        heads = [make_head(W[:, d["roi"]], args.bottleneck) for d, (W, *_) in zip(ds, fits)]
        model = BrainModel(backbone, heads, mu, sd, layer, args.history, n_layers if weighted else 0,
                           normalize).to(device)
        ckpt = load_checkpoint(os.path.join(run, "checkpoint.pt")) if args.resume and os.path.exists(
            os.path.join(run, "checkpoint.pt")) else None
        state = train_stage2(args, model, ds, shared, run, device, ckpt)
        model.eval()
        STEP[0] = "the refit"
        Xs, stats, X = features(model.backbone, model.layer_weights, splits=("test",) if protocol else ("train", "test"))
        if protocol:
            _, stats, X = features(model.backbone, model.layer_weights, protocol)
        for x, d, r in zip(X, ds, heads_r(model, (Xs["test"] - mu) / sd, ds, "test", device, skip=skip)):
            d["res"]["tuned_r"] = np.full(len(d["good"]), np.nan, np.float32)
            d["res"]["tuned_r"][d["roi"]] = r.numpy()  # the tuned model with its own head
            *_, refit, d["blocks"]["refit"] = stage1(args, x, d, device, stats, skip)  # the field's protocol
            d["res"]["refit_r"] = refit.numpy()
        if RANK == 0:
            save_atomic(dict(trainable=state["best"], args=vars(args)), os.path.join(run, "adapter.pt"))
    if RANK == 0:
        tests = {d["subject"]: analyses.summarize(d["res"], d["sets"], d["ceiling"], d["blocks"]) for d in ds}
        scored = analyses.protocol(args)
        per = {d["subject"]: dict(subject=d["subject"], model=args.model, roi=args.roi, n_voxels=int(len(d["roi"])),
                                  protocol=scored, test=tests[d["subject"]]) for d in ds}
        one = len(ds) == 1
        out = per[ds[0]["subject"]] if one else dict(model=args.model, roi=args.roi, protocol=scored, subjects=per)
        save_atomic(json.dumps(out, indent=1), os.path.join(run, "results.json"))
        save_atomic({(k if one else f"{d['subject']}.{k}"): v for d in ds for k, v in d["res"].items()},
                    os.path.join(run, "voxel_r.npz"))
        print(analyses.format_table(tests, scored))
    return run


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except (torch.OutOfMemoryError, MemoryError) as e:
        sys.exit(f"error: out of memory in {STEP[0]} ({str(e).splitlines()[0][:100]}); try a smaller --batch-size "
                 "or --device cpu; what was finished is kept (the cache, the run folder's last checkpoint)")
