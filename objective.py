"""
What stage 2 trains against, and how: each subject's targets on a split (its responses on the
trained voxels, or the permuted-brain control's), the batches read ahead of each step, the loss
(MSE + L2, or the correlation across voxels), the heads' r, --select refit's ridge score, the
optimiser with its schedules (a warm-up, or Moussa et al.'s per-epoch factors), and the state
stage 2 keeps across epochs (the best one, patience, a resumed run's checkpoint).

    t = targets(args, d, "train", roi)          # a Targets: which response row each window scores
    loss = subjects_loss(net(batch.wave), model.heads, batch, args)
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import data
import ridge
import runfolder
from cache import log
from dist import RANK, WORLD
from features import window_features


@dataclass
class Targets:
    """What one subject's head is trained and scored against on one split."""
    window_of: torch.Tensor  # (rows,) the shared window of each row scored
    response_rows: object  # (rows,) LongTensor: the response row each is scored on; or slice(None)
    row_of: torch.Tensor  # (shared windows,) the response row of each, -1 where not heard
    Y: data.Responses  # (responses, voxels)
    roi: np.ndarray  # (n,) the voxels trained on


def targets(args, d, split, roi, skip=0):
    """Subject d's Targets on a split, from each story's row `skip` on (the test split); under
    --control permuted, the training and validation windows are scored on permuted_rows."""
    window_of, rows, row_of = d.window_of[split], slice(None), d.row_of[split]
    if split == "test":
        rows = torch.as_tensor(ridge.scored_rows(d, skip))
        window_of = window_of[rows]
    elif args.control == "permuted":
        rows = permuted_rows([len(e) for e in d.windows[split].ends], args.control_block,
                             args.seed)
        row_of = torch.full_like(row_of, -1)
        row_of[window_of] = rows
    return Targets(window_of, rows, row_of, d.Y[split], roi)


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


@dataclass
class Batch:
    """One step's share of a global batch, read ahead of the step (Batches)."""
    wave: torch.Tensor  # (windows, samples) this process's windows of the global batch
    share: float  # its part of the global batch's windows (DDP averages processes, not windows)
    heard: list  # [(windows,) bool] per subject: which of the windows it heard
    y: list  # [(heard windows, trained voxels)] per subject: its responses to them

    def pin_memory(self):  # the DataLoader pins a batch (CUDA) by this
        return Batch(self.wave.pin_memory(), self.share, self.heard, [y.pin_memory() for y in
                                                                      self.y])


class Batches(torch.utils.data.Dataset):
    """Batch i of an epoch: this process's share of the shuffled windows `order`, its audio and
    every subject's responses to it (Targets), read from the memory-mapped files by the
    DataLoader (in workers ahead of the step, on a GPU), not by the training step."""

    def __init__(self, windows, order, batch_size, targets_):
        self.windows, self.order, self.B, self.targets = windows, order, batch_size, targets_

    def __len__(self):
        return -(-len(self.order) // self.B)

    def __getitem__(self, i):
        batch = self.order[i * self.B:(i + 1) * self.B]
        idx = batch[RANK::WORLD]  # this process's share of the global batch
        wave = torch.stack([self.windows[j][0] for j in idx.tolist()])
        rows = [t.row_of[idx] for t in self.targets]
        y = [t.Y[r[r >= 0], t.roi] for r, t in zip(rows, self.targets)]
        return Batch(wave, len(idx) * WORLD / len(batch), [r >= 0 for r in rows], y)


def subjects_loss(preds, heads, batch, args):
    """The loss of one Batch: for each subject, --loss (loss_fn) over the windows it heard (a
    subject that heard none adds nothing), plus --l2 times its head's squared weights (Li et
    al.); averaged over subjects, so that each counts once, whatever its voxels."""
    losses = []
    for pred, head, heard, y in zip(preds, heads, batch.heard, batch.y):
        if len(y):
            loss = loss_fn(pred[heard.to(pred.device)], y.to(pred.device, non_blocking=True),
                           args.loss)
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
            h = Z[t.window_of].to(model.mu.device)
            for m in first:
                h = m(h)
            r = []
            for j in range(0, len(t.roi), block):
                pred = F.linear(h, last.weight[j:j + block], last.bias[j:j + block])
                r.append(ridge.pearson(pred.float().cpu(), t.Y[t.response_rows,
                                                               t.roi[j:j + block]]))
            out.append(torch.cat(r))
    return out


def selection_r(args, model, ds, train, val, shared, *, cached=False):
    """--select refit's score of the backbone as it is: its window features of the training and
    validation stories (cached only with `cached`: each epoch's are new), z-scored by the training
    rows', a ridge (the run's lambdas and folds) fit on each subject's training rows for its
    trained voxels (train: [Targets]), scored on each validation story (val); the mean over
    subjects of the mean over the trained voxels of each voxel's r averaged over the stories
    (BrainWavLM's brain_best_linear.py)."""
    model.eval()
    ex, device = model.extractor, model.mu.device
    fn = functools.partial(ex.pooled, history=args.history)
    key = ex.key() if cached else None
    X = {s: window_features(fn, shared[s], key, device, batch_size=args.infer_batch,
                            desc=f"refit {s}", precision=args.precision) for s in ("train", "val")}
    mu, sd = ridge.moments(X["train"])
    settings = config.ridge_settings(args, ds)
    out = []
    for d, t, v in zip(ds, train, val):
        Z = {s: (x[e.window_of] - mu) / sd for (s, x), e in zip(X.items(), (t, v))}
        groups = ridge.story_folds([len(e) for e in d.windows["train"].ends], settings.folds)
        fit = ridge.fit_ridge(Z["train"].to(device), TrainedVoxels(t), settings.alphas, groups)
        pred, y = Z["val"] @ fit.W, v.Y[v.response_rows, v.roi]  # (rows, trained voxels)
        lengths = [len(e) for e in d.windows["val"].ends]
        out.append(story_mean_r(pred, y, lengths).nanmean().item())
    return float(np.mean(out))


def story_mean_r(pred, y, lengths):
    """(voxels,) each voxel's r on each story (of `lengths` consecutive rows of pred and y,
    (rows, voxels)), averaged over the stories, as BrainWavLM's brain_best_linear.py scores an
    epoch, rather than one r over the stories' rows joined."""
    ends = np.cumsum([0] + list(lengths))
    return torch.stack([ridge.pearson(pred[a:b], y[a:b]) for a, b in zip(ends, ends[1:])]).mean(0)


class TrainedVoxels:
    """A subject's Targets as the (rows, trained voxels) matrix fit_ridge reads a block of voxels
    at a time (Y[:, cols]), its rows in the order the targets score them (--control permuted)."""

    def __init__(self, t):
        self.t, self.shape = t, (len(t.window_of), len(t.roi))

    def __getitem__(self, index):
        rows, cols = index
        assert rows == slice(None), "fit_ridge reads whole columns"
        return self.t.Y[self.t.response_rows, self.t.roi[cols]]


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


# -----------------------------------------------------------------------------
# stage 2's state across epochs: the best epoch, patience, a resumed run's checkpoint

@dataclass
class TrainState:
    """Where stage 2 is, as its checkpoint keeps it."""
    epoch: int = 0  # epochs finished
    best_val: float = -float("inf")  # the best validation r so far
    bad_epochs: int = 0  # epochs since it improved
    metrics: list = None  # one dict per epoch (metrics.jsonl)
    best: dict = None  # {name: tensor}: the trainable parameters of the best epoch, on the CPU
    best_epoch: int = 0  # the epoch they are of (0: the initial state)
    pretrained_val: float = None  # --select refit: the pretrained backbone's refit validation r


def resume_stage2(args, run, model, opt, sched):
    """The run's last checkpoint loaded into model, opt and sched (its TrainState), or None; the
    steering flags given with --resume recorded in config.json with the epoch they take effect
    at."""
    ckpt = runfolder.read_checkpoint(run) if args.resume else None
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        model.load_state_dict(ckpt["trainable"], strict=False)
    state = TrainState(**ckpt["state"]) if ckpt is not None else None
    if args.steered and RANK == 0:
        epoch = state.epoch if state else 0
        runfolder.steer_config(run, args.steered, epoch)
        log(f"resumed at epoch {epoch} with " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                          for k, v in args.steered.items()))
    return state


def record_epoch(args, state, metrics, trainable):
    """One epoch's metrics into the state: the kept epoch's parameters on the CPU (--select's:
    the best validation r, or the last epoch named), patience counted (val and refit only)."""
    score = metrics["refit_val_r" if args.select == "refit" else "val_r"]
    named = config.scored_epochs(args)  # --select last or 6,11,21: the last named is kept
    better = metrics["epoch"] == named[-1] if named else score > state.best_val
    state.metrics.append(metrics)
    state.epoch, state.best_val = metrics["epoch"], max(state.best_val, score)
    state.bad_epochs = 0 if better or named else state.bad_epochs + 1
    if better:
        state.best = {n: p.detach().cpu().clone() for n, p in trainable.items()}
        state.best_epoch = metrics["epoch"]
    refit = f", refit validation r {score:.4f}" if args.select == "refit" else ""
    log(f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, validation r "
        f"{metrics['val_r']:.4f}{refit}, {metrics['seconds']:.1f} s")
