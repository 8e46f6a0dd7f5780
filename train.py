"""
Brain-tuning: fine-tune a self-supervised speech model so that it predicts fMRI responses.

Stage 1: the frozen backbone turns every delayed-TR window into features, ridge regression with a
per-voxel lambda maps them to every voxel; that is the baseline and the head's initialisation.
Stage 2: LoRA adapters (or the whole transformer) and the head train together; then the tuned
backbone's features are re-extracted and ridge refit, the field's protocol (README, "The method").

    python train.py --subject S01 --roi all     # synthetic dataset, tiny model, a minute on CPU
    python train.py --data ds003020 --subject UTS01 --recipe brainwavlm
    torchrun --nproc_per_node 2 train.py ...    # data parallel, one process per device
"""
import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

import cache
import config
import data
import ridge
import synthetic
from cache import log, save_atomic
from model import (BrainModel, add_adapters, keep_freed_memory, load_checkpoint, load_extractor,
                   make_head, split_features, tiny_weights, uses_bf16, window_features)

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
STEP = ["starting"]  # what the run is doing, for an error that cannot be foreseen (out of memory)
FORMAT = 2  # of stage1.pt, checkpoint.pt and adapter.pt: dicts with named keys


@dataclass
class Features:
    """The features of the windows the subjects share, and each subject's rows of them."""
    shared: dict  # {split: (shared windows, p)}
    mu: torch.Tensor  # (p,) the first split's mean: one z-scoring for every head
    sd: torch.Tensor  # (p,)
    subjects: list  # [{split: (rows, p)}], one per subject


@dataclass
class Targets:
    """What one subject's head is trained and scored against on one split."""
    take: torch.Tensor  # (rows,) the shared window of each row scored
    rows: object  # (rows,) LongTensor: the response row each is scored on; slice(None): in order
    row: torch.Tensor  # (shared windows,) the response row of each, -1 where not heard
    Y: data.Responses  # (responses, voxels)
    roi: np.ndarray  # (n,) the voxels trained on


@dataclass
class TrainState:
    """Where stage 2 is, as its checkpoint keeps it."""
    epoch: int = 0  # epochs finished
    best_val: float = -float("inf")  # the best validation r so far
    bad_epochs: int = 0  # epochs since it improved
    metrics: list = None  # one dict per epoch (metrics.jsonl)
    best: dict = None  # {name: tensor}: the trainable parameters of the best epoch
    best_epoch: int = 0  # the epoch they are of (0: the initial state)
    pretrained_val: float = None  # --select refit: the pretrained backbone's refit validation r


# -----------------------------------------------------------------------------
# the method, step by step

def brain_tune(args):
    """Both stages and the results, for the flags in args (config.parse); returns the run
    folder."""
    device = start(args)
    run = run_folder(args)
    listings = preflight(args, device)  # every mistake the flags and listings show, before work
    settings = config.ridge_settings(args, listings)
    own = os.path.join(run, "tiny_pretrained.pt")  # tiny's pretraining, kept in the run folder
    weights = own if args.resume and os.path.isfile(own) else args.weights
    pretraining = args.model == "tiny" and weights is None and args.tiny_pretrain > 0
    if not pretraining:  # a failed download or a bad --weights file, before the data are read
        extractor = load_extractor(args.model, args.layer, weights, args.seed,
                                   args.backbone_dropout, pool=args.pool)
    if WORLD > 1 and RANK > 0:
        torch.distributed.barrier()  # rank 0 fills the caches (data, tiny, stage 1) first
    STEP[0] = "loading the data"
    ds, shared = config.load_subjects(args, args.subject.split(","))
    threshold = data.nc_threshold(args.roi)
    for d in ds:
        if args.roi.startswith("top") and int(args.roi[3:]) > d.good.sum():
            raise ValueError(f"--roi {args.roi}: {d.name} has {d.good.sum()} usable voxels")
        if threshold is not None and not (d.good & (d.ceiling > threshold)).any():
            raise ValueError(f"--roi {args.roi}: no usable voxel of {d.name} has a noise ceiling "
                             f"above {threshold:g}")
    if pretraining:
        STEP[0] = "tiny's pretraining"
        state = tiny_weights(args.data, shared["train"], args.tiny_pretrain, args.seed)
        extractor = load_extractor(args.model, args.layer, state, args.seed,
                                   args.backbone_dropout, pool=args.pool)
    begin(args, run, ds, shared, extractor, device, pretrained=state if pretraining else None)
    extractor.to(device)
    fits = stage1(args, extractor, ds, shared, run, settings)
    if WORLD > 1 and RANK == 0:
        torch.distributed.barrier()  # the caches are full: the other processes go on
    results = [choose_voxels(args, d, fit) for d, fit in zip(ds, fits)]
    if args.epochs > 0:
        model = brain_model(args, extractor, fits, results, device)
        model = stage2(args, model, ds, results, shared, run)
        refit(args, model, ds, results, shared, settings)
    if RANK == 0:
        report(args, run, ds, results)
    return run


def start(args):
    """The device (and the process group under torchrun), and the synthetic dataset made if
    absent."""
    if WORLD > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # this process's device under torchrun
    device = torch.device(args.device or (local if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()
    if args.synthetic and not os.path.isdir(args.data) and RANK == 0:
        log(f"making the synthetic dataset in {args.data} (once)")
        with cache.atomic_folder(args.data) as tmp:
            synthetic.make_demo(tmp)
    return device


def preflight(args, device):
    """The flags against the dataset's listings and headers (data.check_dataset) and against
    memory (config.check_sizes), before anything is loaded; returns the listings."""
    textgrids = args.model == "tiny" and args.weights is None and args.tiny_pretrain > 0
    listings = config.list_subjects(args, args.subject.split(","),
                                    textgrids=textgrids and not args.resume)
    config.check_sizes(args, listings, device)
    return listings


def begin(args, run, ds, shared, extractor, device, *, pretrained=None):
    """The run folder, its config and tiny's pretrained weights (resume and eval.py load them
    there); the log's first lines."""
    if RANK == 0:
        os.makedirs(run, exist_ok=True)
    if pretrained is not None and RANK == 0:
        save_atomic(pretrained, os.path.join(run, "tiny_pretrained.pt"))
    layer = "weighted" if extractor.layer_weights is not None else extractor.layer
    log(f"{'+'.join(d.name for d in ds)}: model {args.model} (recipe {args.recipe or 'none'}), "
        f"layer {layer}, {len(shared['train'])} training windows of {args.history} TRs from "
        f"{len(shared['train'].stories)} stories; run folder {run}")
    how = "bf16 autocast" if uses_bf16(device, args.precision) else "float32"
    log(f"device {device}: the backbone in {how}, the ridge in float32")
    if args.control != "none":
        log(f"control {args.control}: stage 2 trains on responses whose blocks of "
            f"{args.control_block} TRs are permuted within each story; the test story is real")
    if RANK == 0 and not args.resume:
        flags = config.flags_record(args)
        if pretrained is not None:  # the weights the run used (found in its folder by resume)
            flags["weights"] = os.path.abspath(os.path.join(run, "tiny_pretrained.pt"))
        cfg = dict(args=flags, stories={d.name: d.stories for d in ds},
                   torch=torch.__version__, torchaudio=torchaudio.__version__,
                   numpy=np.__version__)
        save_atomic(json.dumps(cfg, indent=1), os.path.join(run, "config.json"))


def shared_features(args, extractor, ds, shared, protocol=None, splits=("train", "test")):
    """Each shared window (or story) forwarded once (split_features): Features."""
    X = split_features(extractor, {s: shared[s] for s in splits}, args.history,
                       next(extractor.parameters()).device, batch_size=args.batch_size,
                       protocol=protocol, precision=args.precision)
    mu, sd = X[splits[0]].mean(0), X[splits[0]].std(0).clamp_min(1e-6)
    return Features(X, mu, sd, [{s: rows_of(X[s], d.take[s]) for s in X} for d in ds])


def rows_of(x, take):
    """x[take], without a copy when take is every row in order (a subject who heard them all)."""
    if len(take) == len(x) and bool((take == torch.arange(len(x))).all()):
        return x
    return x[take]


def stage1(args, extractor, ds, shared, run, settings):
    """The frozen backbone's features -> ridge per subject (ridge.Stage1): its fit on the windows
    (the head's initialisation and topN) and the fit its baseline is scored by (the same, or
    under --protocol's features). Kept in stage1.pt, which a resumed run reads."""
    path = os.path.join(run, "stage1.pt")
    if args.resume and os.path.exists(path):
        return read_stage1(path)
    STEP[0] = "stage 1"
    device = next(extractor.parameters()).device
    X = shared_features(args, extractor, ds, shared)
    init = [ridge.fit_encoding(x, d, settings, device, (X.mu, X.sd))
            for x, d in zip(X.subjects, ds)]
    baseline = init
    if args.scoring.sliding:
        X = shared_features(args, extractor, ds, shared, args.scoring)
        baseline = [ridge.fit_encoding(x, d, settings, device, (X.mu, X.sd))
                    for x, d in zip(X.subjects, ds)]
    fits = [ridge.Stage1(a, b) for a, b in zip(init, baseline)]
    if RANK == 0:
        subjects = [dict(init=ridge.fit_state(f.init),
                         baseline=None if f.baseline is f.init else ridge.fit_state(f.baseline))
                    for f in fits]
        save_atomic(dict(format=FORMAT, subjects=subjects), path)
    return fits


def read_stage1(path):
    """stage1.pt back as [ridge.Stage1]; one written before FORMAT 2 is refused."""
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path}: written by an older braintune (not a dict of named fits); run "
                         "stage 1 again in a new run folder")
    fits = []
    for s in saved["subjects"]:
        init = ridge.fit_from_state(s["init"])
        base = init if s["baseline"] is None else ridge.fit_from_state(s["baseline"])
        fits.append(ridge.Stage1(init, base))
    return fits


def choose_voxels(args, d, fit):
    """A subject's results so far (ridge.Results): its voxel sets, the voxels trained on
    (--roi; ncT: those whose noise ceiling d.ceiling exceeds T), the baseline r and its block
    sums."""
    sets = ridge.sets(d, fit.init.cv_r, args.roi)
    threshold = data.nc_threshold(args.roi)
    if args.roi.startswith("top"):
        roi = sets[args.roi]
    elif threshold is not None:
        roi = np.intersect1d(np.flatnonzero(d.ceiling > threshold), sets["all"])
    else:
        roi = np.intersect1d(data.load_roi(args.data, d.name, args.roi, len(d.good)), sets["all"])
    return ridge.Results(sets, roi, fit.baseline.test_r.numpy(), fit.baseline.blocks)


def brain_model(args, extractor, fits, results, device):
    """The model stage 2 trains: adapters on layers 1..layer (--lora-rank 0: the whole
    transformer up to it) and a head per subject holding its ridge weights on its trained
    voxels."""
    # the adapters' init must not depend on what the caches spared (DataLoaders draw seeds)
    torch.manual_seed(args.seed)
    add_adapters(extractor.backbone, extractor.layer, args.lora_rank, args.lora_alpha,
                 args.lora_dropout, args.lora_targets,
                 weighted=extractor.layer_weights is not None)
    heads = [make_head(f.init.W[:, r.roi], args.bottleneck) for f, r in zip(fits, results)]
    mu, sd = fits[0].init.mu, fits[0].init.sd  # the shared windows' z-scoring
    return BrainModel(extractor, heads, mu, sd, args.history).to(device)


def stage2(args, model, ds, results, shared, run):
    """The adapters (or the transformer) and every head trained together, from the run's last
    checkpoint when resuming; the best epoch by validation r (the mean over subjects) is kept:
    the heads' own (--select val), or a ridge refit's (--select refit: refit_val_r), where the
    initial state (epoch 0) is a candidate. Returns the model, in eval mode."""
    device = model.mu.device
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt, sched = optimiser(args, trainable, len(shared["train"]))
    state = resume_stage2(args, run, model, opt, sched) or TrainState(
        metrics=[], best={n: p.detach().clone() for n, p in trainable.items()})
    train = [targets(args, d, "train", r.roi) for d, r in zip(ds, results)]
    val = [targets(args, d, "val", r.roi) for d, r in zip(ds, results)]
    if args.select == "refit" and not state.metrics:  # the pretrained backbone, a candidate
        model.eval()
        state.pretrained_val = state.best_val = refit_val_r(args, model.extractor, ds, train,
                                                            val, shared, cached=True)
        log(f"epoch 0 (pretrained): refit validation r {state.pretrained_val:.4f}")
    net = model if WORLD == 1 else nn.parallel.DistributedDataParallel(  # a subject may hear none
        model, find_unused_parameters=args.lora_rank == 0 or len(ds) > 1)
    windows, B = shared["train"], args.batch_size
    for epoch in range(state.epoch, args.epochs):
        if state.bad_epochs >= args.patience:
            break
        t0, STEP[0] = time.time(), f"stage 2, epoch {epoch + 1}"
        net.train()
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed +
                                                                                      epoch))
        if 0 < len(order) % B < WORLD:  # a last batch smaller than the processes: left out
            order = order[:len(order) - len(order) % B]
        n, losses = -(-len(order) // B), []  # batches this epoch
        for i, first in enumerate(cache.progress(range(0, len(order), B), f"epoch {epoch + 1}")):
            batch = order[first:first + B]
            idx = batch[RANK::WORLD]  # this process's share of the global batch
            wave = torch.stack([windows[j][0] for j in idx.tolist()]).to(device)
            with torch.autocast("cuda", torch.bfloat16, enabled=uses_bf16(device, args.precision)):
                preds = net(wave)  # every head on the one forward of the shared windows
            loss = subjects_loss(preds, model.heads, train, idx, args)
            if not torch.isfinite(loss):
                raise ValueError(f"the loss became {loss.item()} at epoch {epoch + 1}, step "
                                 f"{i + 1}; stopped, and the last good checkpoint in {run} is "
                                 "kept (try a lower --lr)")
            share = len(idx) * WORLD / len(batch)  # DDP averages processes: weigh by windows
            group = min(args.accum, n - i // args.accum * args.accum)  # the last may be short
            (loss * share / group).backward()
            if (i + 1) % args.accum == 0 or first + B >= len(order):
                if args.clip > 0:  # 0: no clipping
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                rates = [g["lr"] for g in opt.param_groups]  # the epoch's last step's, logged
                opt.step()
                if args.schedule == "warmup":  # stepped per optimiser step
                    sched.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if args.schedule == "moussa2025":  # stepped once per epoch, as their LambdaLR
            sched.step()
        model.eval()
        Z = window_features(model.features, shared["val"], None, device,
                            batch_size=args.batch_size, desc="validation", precision=args.precision)
        val_r = [r.nanmean().item() for r in heads_r(model, Z, val)]
        m = dict(epoch=epoch + 1, train_loss=float(np.mean(losses)), val_r=float(np.mean(val_r)),
                 lr=rates[0], head_lr=rates[1])
        if args.select == "refit":
            m["refit_val_r"] = refit_val_r(args, model.extractor, ds, train, val, shared)
            if epoch == 0:
                m["pretrained_refit_val_r"] = state.pretrained_val
        record_epoch(args, state, dict(m, seconds=round(time.time() - t0, 2)), trainable)
        if len(ds) > 1:
            state.metrics[-1]["val_r_subjects"] = {d.name: v for d, v in zip(ds, val_r)}
        if RANK == 0:
            save_checkpoint(run, state, opt, sched, trainable)
    model.load_state_dict(state.best, strict=False)
    if args.select == "refit":
        log(f"kept epoch {state.best_epoch} (refit validation r {state.best_val:.4f}; 0 is the "
            "pretrained backbone)")
    if RANK == 0:
        save_atomic(dict(format=FORMAT, trainable=state.best, epoch=state.best_epoch,
                         args=config.flags_record(args)), os.path.join(run, "adapter.pt"))
    return model.eval()


def refit_val_r(args, extractor, ds, train, val, shared, *, cached=False):
    """--select refit's score of the backbone as it is: its window features of the training and
    validation stories (cached only with `cached`: each epoch's are new), z-scored by the training
    rows', a ridge (ridge.fit_ridge, the run's lambdas and folds) fit on each subject's training
    rows for its trained voxels (train: [Targets]), scored on its validation rows (val); the mean
    over subjects of the mean r over the trained voxels."""
    device = next(extractor.parameters()).device
    fn = functools.partial(extractor.pooled, history=args.history)
    key = extractor.key() if cached else None
    X = {s: window_features(fn, shared[s], key, device, batch_size=args.batch_size,
                            desc=f"refit {s}", precision=args.precision) for s in ("train", "val")}
    mu, sd = X["train"].mean(0), X["train"].std(0).clamp_min(1e-6)
    settings = config.ridge_settings(args, ds)
    out = []
    for d, t, v in zip(ds, train, val):
        Z = {s: (x[e.take] - mu) / sd for (s, x), e in zip(X.items(), (t, v))}
        groups = ridge.story_folds([len(e) for e in d.windows["train"].ends], settings.folds)
        W, _ = ridge.fit_ridge(Z["train"].to(device), TrainedVoxels(t), settings.alphas, groups)
        r = ridge.pearson(Z["val"] @ W, v.Y[v.rows, v.roi])  # (trained voxels,)
        out.append(r.nanmean().item())
    return float(np.mean(out))


class TrainedVoxels:
    """A subject's Targets as the (rows, trained voxels) matrix fit_ridge reads a block of voxels
    at a time (Y[:, cols]), its rows in the order the targets score them (--control permuted)."""

    def __init__(self, t):
        self.t, self.shape = t, (len(t.take), len(t.roi))

    def __getitem__(self, index):
        rows, cols = index
        assert rows == slice(None), "fit_ridge reads whole columns"
        return self.t.Y[self.t.rows, self.t.roi[cols]]


MOUSSA_WARMUP, MOUSSA_EPOCHS = 5, 30  # brain_trainer_story.py:40-53 (increase_epochs, epochs)


def moussa_backbone_factor(epoch):
    """Moussa et al.'s backbone lr factor at 0-based epoch e (their schedule_group_0): e / 5 for
    e < 5 (0 in the first epoch), then 1 - (e - 5) / 25, 0 from epoch 30 on (never negative)."""
    if epoch < MOUSSA_WARMUP:
        return epoch / MOUSSA_WARMUP
    return max(0.0, 1 - (epoch - MOUSSA_WARMUP) / (MOUSSA_EPOCHS - MOUSSA_WARMUP))


def moussa_head_factor(epoch):
    """Moussa et al.'s head lr factor at 0-based epoch e (their schedule_group_1)."""
    return max(0.8 ** epoch, 0.1)


def optimiser(args, trainable, n_windows):
    """AdamW with --lr for the backbone and --head-lr for the heads (weight decay 0: Adam), and
    its scheduler: --schedule warmup, a linear warm-up over --warmup epochs of optimiser steps,
    stepped per step; moussa2025, the factors above, stepped once per epoch (stage2), so that
    0-based epoch e trains with factor(e), as their LambdaLR does."""
    heads = [p for n, p in trainable.items() if n.startswith("heads.")]
    backbone = [p for n, p in trainable.items() if not n.startswith("heads.")]
    opt = torch.optim.AdamW([{"params": backbone, "lr": args.lr},
                             {"params": heads, "lr": args.head_lr}], weight_decay=0.0)
    if args.schedule == "moussa2025":
        factors = [moussa_backbone_factor, moussa_head_factor]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factors)
    steps = -(-n_windows // (args.batch_size * args.accum))  # optimiser steps per epoch
    warmup = max(1, args.warmup * steps)

    def factor(step):
        return min(1.0, (step + 1) / warmup)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def resume_stage2(args, run, model, opt, sched):
    """The run's last checkpoint loaded into model, opt and sched (its TrainState), or None; the
    steering flags given with --resume recorded in config.json with the epoch they take effect
    at."""
    path = os.path.join(run, "checkpoint.pt")
    epoch, state = 0, None
    if args.resume and os.path.exists(path):
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != FORMAT:
            raise ValueError(f"{path}: written by an older braintune; start a new run")
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        model.load_state_dict(ckpt["trainable"], strict=False)
        torch.set_rng_state(ckpt["rng"])
        state = TrainState(**ckpt["state"])
        epoch = state.epoch
    if args.steered and RANK == 0:
        path = os.path.join(run, "config.json")
        cfg = cache.read_json(path)
        cfg["args"].update(args.steered)
        cfg.setdefault("resumed", []).append(dict(epoch=epoch, flags=args.steered))
        save_atomic(json.dumps(cfg, indent=1), path)
        log(f"resumed at epoch {epoch} with " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                          for k, v in args.steered.items()))
    return state


def record_epoch(args, state, metrics, trainable):
    """One epoch's metrics into the state: the best epoch's parameters kept (by --select's
    validation r), patience counted."""
    score = metrics["refit_val_r" if args.select == "refit" else "val_r"]
    better = score > state.best_val
    state.metrics.append(metrics)
    state.epoch, state.best_val = metrics["epoch"], max(state.best_val, score)
    state.bad_epochs = 0 if better else state.bad_epochs + 1
    if better:
        state.best = {n: p.detach().clone() for n, p in trainable.items()}
        state.best_epoch = metrics["epoch"]
    refit = f", refit validation r {score:.4f}" if args.select == "refit" else ""
    log(f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, validation r "
        f"{metrics['val_r']:.4f}{refit}, {metrics['seconds']:.1f} s")


def save_checkpoint(run, state, opt, sched, trainable):
    """checkpoint.pt (what a resumed run continues from) and metrics.jsonl, each atomically."""
    params = {n: p.detach().clone() for n, p in trainable.items()}
    save_atomic(dict(format=FORMAT, opt=opt.state_dict(), sched=sched.state_dict(),
                     rng=torch.get_rng_state(), state=vars(state), trainable=params),
                os.path.join(run, "checkpoint.pt"))
    lines = "".join(json.dumps(m) + "\n" for m in state.metrics)
    save_atomic(lines, os.path.join(run, "metrics.jsonl"))


def targets(args, d, split, roi, skip=0):
    """Subject d's Targets on a split, from each story's row `skip` on (the test split); under
    --control permuted, the training and validation windows are scored on permuted_rows."""
    take, rows, row = d.take[split], slice(None), d.row[split]
    if split == "test":
        rows = torch.as_tensor(ridge.scored_rows(d, skip))
        take = take[rows]
    elif args.control == "permuted":
        rows = permuted_rows([len(e) for e in d.windows[split].ends], args.control_block,
                             args.seed)
        row = torch.full_like(row, -1)
        row[take] = rows
    return Targets(take, rows, row, d.Y[split], roi)


def permuted_rows(lengths, block, seed):
    """The permuted-brain control (Moussa et al.): for stories of `lengths` rows, each story's
    blocks of `block` rows in a seeded order in which no block keeps its place (a random cycle of
    the blocks), as one (rows,) index: row r is scored on response row out[r]."""
    rng, out, start = np.random.default_rng(seed), [], 0
    for n in lengths:
        blocks = [np.arange(a, min(a + block, n)) + start for a in range(0, n, block)]
        order = rng.permutation(len(blocks))
        moved = [None] * len(blocks)
        for k, b in enumerate(order):  # block order[k] takes the content of block order[k + 1]
            moved[b] = blocks[order[(k + 1) % len(blocks)]]
        out += moved
        start += n
    return torch.as_tensor(np.concatenate(out))


def subjects_loss(preds, heads, targets_, idx, args):
    """The loss of one batch of shared windows idx: for each subject, --loss (loss_fn) over the
    windows it heard (a subject that heard none adds nothing), plus --l2 times its head's squared
    weights (Li et al.); averaged over subjects, so that each counts once, whatever its voxels."""
    losses = []
    for pred, head, t in zip(preds, heads, targets_):
        r = t.row[idx]
        heard = r >= 0  # the windows of this batch that the subject heard
        if heard.any():
            y = t.Y[r[heard], t.roi].to(pred.device)
            loss = loss_fn(pred[heard].float(), y, args.loss)
            if args.l2:
                weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
                loss = loss + args.l2 * sum(p.square().sum() for p in weights)
            losses.append(loss)
    return torch.stack(losses).mean()


def loss_fn(pred, y, kind):
    """mse, or corr: minus the correlation across voxels of each TR, averaged (BrainWavLM)."""
    if kind == "mse":
        return F.mse_loss(pred, y)
    return -ridge.pearson(pred.T, y.T).mean()


def heads_r(model, Z, targets_, block=16384):
    """Each subject's r over its trained voxels, from z-scored features Z (shared windows, p);
    the predictions and responses are taken a block of voxels at a time."""
    out = []
    with torch.no_grad():
        for head, t in zip(model.heads, targets_):
            *first, last = head if isinstance(head, nn.Sequential) else [head]  # a bottleneck
            h = Z[t.take].to(model.mu.device)
            for m in first:
                h = m(h)
            r = []
            for j in range(0, len(t.roi), block):
                pred = F.linear(h, last.weight[j:j + block], last.bias[j:j + block])
                r.append(ridge.pearson(pred.float().cpu(), t.Y[t.rows, t.roi[j:j + block]]))
            out.append(torch.cat(r))
    return out


def refit(args, model, ds, results, shared, settings):
    """The tuned model scored twice on the test story: with its own heads (tuned r), and by the
    field's protocol, its features re-extracted and ridge refit (refit r), under --protocol."""
    STEP[0] = "the refit"
    ex = model.extractor
    splits = ("test",) if args.scoring.sliding else ("train", "test")
    X = own = shared_features(args, ex, ds, shared, splits=splits)
    if args.scoring.sliding:
        X = shared_features(args, ex, ds, shared, args.scoring)
    test = [targets(args, d, "test", r.roi, args.test_skip) for d, r in zip(ds, results)]
    Z = (own.shared["test"] - model.mu.cpu()) / model.sd.cpu()
    tuned = heads_r(model, Z, test)
    for x, d, res, r in zip(X.subjects, ds, results, tuned):
        res.tuned_r = np.full(len(d.good), np.nan, np.float32)
        res.tuned_r[res.roi] = r.numpy()
        fit = ridge.fit_encoding(x, d, settings, model.mu.device, (X.mu, X.sd))
        res.refit_r, res.refit_blocks = fit.test_r.numpy(), fit.blocks


def report(args, run, ds, results):
    """blocks.pt (each subject's test block sums, baseline and refit: compare.read_blocks),
    results.json, voxel_r.npz and the results table."""
    tests = {d.name: ridge.summarize(r, d.ceiling) for d, r in zip(ds, results)}
    scored = dict(vars(args.scoring))
    if scored["frame"] == "last":  # named only when not the default: today's keys unchanged
        del scored["frame"]
    if args.pool != "bins":  # the head's input (and the windows protocol's features)
        scored["pool"] = args.pool
    extra = {} if args.control == "none" else dict(control=dict(kind=args.control,
                                                                block=args.control_block))
    per = {d.name: dict(subject=d.name, model=args.model, roi=args.roi,
                        n_voxels=int(len(r.roi)), protocol=scored, **extra, test=tests[d.name])
           for d, r in zip(ds, results)}
    one = len(ds) == 1
    res = per[ds[0].name] if one else dict(model=args.model, roi=args.roi, protocol=scored,
                                           **extra, subjects=per)
    blocks = {d.name: {k: None if b is None else dict(sums=b.sums, rows=b.rows)
                       for k, b in (("baseline", r.baseline_blocks), ("refit", r.refit_blocks))}
              for d, r in zip(ds, results)}
    save_atomic(dict(format=FORMAT, subjects=blocks), os.path.join(run, "blocks.pt"))
    save_atomic(json.dumps(res, indent=1), os.path.join(run, "results.json"))
    arrays = {(k if one else f"{d.name}.{k}"): v for d, r in zip(ds, results)
              for k, v in r.r().items()}
    save_atomic(arrays, os.path.join(run, "voxel_r.npz"))
    line = dict(scored, control=f"{args.control} (blocks of {args.control_block} TRs)") \
        if extra else scored
    print(ridge.format_table(tests, line))


def run_folder(args):
    """The run folder: --resume's, --out, or a new name; an existing one is refused without
    --force. The first process decides and tells the others (a new name holds the time)."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    default = os.path.join("runs", f"{args.subject.replace(',', '+')}_{args.roi}_{args.model}_"
                                   f"{stamp}")
    name = [args.resume or args.out or default]
    if WORLD > 1:
        torch.distributed.broadcast_object_list(name)  # rank 0's
    taken = os.path.exists(name[0]) and (not os.path.isdir(name[0]) or os.listdir(name[0]))
    if RANK == 0 and not args.resume and taken and not args.force:
        raise ValueError(f"{name[0]} already exists; use --resume {name[0]} to continue it or "
                         "--force to overwrite it")
    return name[0]


def main(argv=None):
    args = config.parse(argv)
    with cache.no_cache() if args.no_cache else contextlib.nullcontext():
        return brain_tune(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except (torch.OutOfMemoryError, MemoryError) as e:
        sys.exit(f"error: out of memory in {STEP[0]} ({str(e).splitlines()[0][:100]}); try a "
                 "smaller --batch-size or --device cpu; what was finished is kept (the cache, "
                 "the run folder's last checkpoint)")
