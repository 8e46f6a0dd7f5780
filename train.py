"""
Brain-tuning: fine-tune a self-supervised speech model so that it predicts fMRI responses.

Stage 1: the frozen backbone turns every delayed-TR window into features, ridge regression with a
per-voxel lambda maps them to every voxel; that is the baseline and the head's initialisation.
Stage 2: LoRA adapters (or the whole transformer) and the head train together; then the tuned
backbone's features are re-extracted and ridge refit, the field's protocol (README, "Evaluation").

    python train.py --subject S01 --roi all            # synthetic dataset, tiny model, about a minute on CPU
    python train.py --data ds003020 --subject UTS01 --recipe brainwavlm
    torchrun --nproc_per_node 2 train.py ...           # data parallel, one process per device
"""
import contextlib
import json
import os
import sys
import time

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
from model import (BrainModel, add_adapters, keep_freed_memory, layer_of, load_backbone, load_checkpoint, make_head,
                   split_features, tiny_weights, uses_bf16, window_features)

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
STEP = ["starting"]  # what the run is doing, for an error that cannot be foreseen (out of memory)


# -----------------------------------------------------------------------------
# the method, step by step

def brain_tune(args):
    """Both stages and the results, for the flags in args (parse); returns the run folder."""
    device = start(args)
    run = run_folder(args)
    config.check(args)  # every mistake the flags and listings show, before any costly work
    pretraining = args.model == "tiny" and args.weights is None and args.tiny_pretrain > 0
    if not pretraining:  # a failed download or a bad --weights file, before the data are read
        backbone, normalize = load_backbone(args.model, args.weights, args.seed, args.backbone_dropout)
    if WORLD > 1 and RANK > 0:
        torch.distributed.barrier()  # rank 0 fills the caches (data, tiny, stage 1) first; the others read them
    STEP[0] = "loading the data"
    ds, shared = config.load_subjects(args, args.subject.split(","))
    for d in ds:
        if args.roi.startswith("top") and int(args.roi[3:]) > d.good.sum():
            raise ValueError(f"--roi {args.roi}: {d.name} has {d.good.sum()} usable voxels")
    if pretraining:
        STEP[0] = "tiny's pretraining"
        weights = tiny_weights(args.data, shared["train"], args.tiny_pretrain, args.seed)
        backbone, normalize = load_backbone(args.model, weights, args.seed, args.backbone_dropout)
    layer = layer_of(args.layer, len(backbone.encoder.transformer.layers))
    begin(args, run, ds, shared, layer, weights if pretraining else None, device)
    stats, fits, scored = stage1(args, backbone.to(device), normalize, layer, ds, shared, run, device)
    if WORLD > 1 and RANK == 0:
        torch.distributed.barrier()  # the caches are full: the other processes go on
    out = [choose_voxels(args, d, fit, base) for d, fit, base in zip(ds, fits, scored)]
    if args.epochs > 0:
        model = brain_model(args, backbone, normalize, layer, stats, out, fits, device)
        model = stage2(args, model, ds, out, shared, run, device)
        refit(args, model, ds, out, shared, device)
    if RANK == 0:
        report(args, run, ds, out)
    return run


def start(args):
    """The device (and the process group under torchrun), and the synthetic dataset made if absent."""
    if WORLD > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()
    if args.synthetic and not os.path.isdir(args.data) and RANK == 0:
        log(f"making the synthetic dataset in {args.data} (once)")
        synthetic.make_demo(args.data + ".tmp")
        os.replace(args.data + ".tmp", args.data)
    return device


def begin(args, run, ds, shared, layer, pretrained, device):
    """The run folder, its config and tiny's pretrained weights (resume and eval.py load them there);
    the log's first line."""
    if RANK == 0:
        os.makedirs(run, exist_ok=True)
    if pretrained is not None:
        args.weights = os.path.abspath(os.path.join(run, "tiny_pretrained.pt"))
        if RANK == 0:
            save_atomic(pretrained, args.weights)
    log(f"{'+'.join(d.name for d in ds)}: model {args.model} (recipe {args.recipe or 'none'}), layer "
        f"{args.layer if args.layer == 'weighted' else layer}, {len(shared['train'])} training windows of "
        f"{args.history} TRs from {len(shared['train'].stories)} stories; run folder {run}")
    log(f"device {device}: the backbone in {'bf16 autocast' if uses_bf16(device, args.precision) else 'float32'}, "
        "the ridge in float32")
    if RANK == 0 and not args.resume:
        cfg = dict(args=vars(args), stories={d.name: d.stories for d in ds}, torch=torch.__version__,
                   torchaudio=torchaudio.__version__, numpy=np.__version__)
        save_atomic(json.dumps(cfg, indent=1), os.path.join(run, "config.json"))


def features(args, backbone, lw, layer, normalize, ds, shared, device, protocol=None, splits=("train", "test")):
    """Each shared window (or story) forwarded once: the features, the z-scoring of the first split
    (one for every head), and each subject's rows {split: (rows, p)}."""
    X = split_features(args.model, backbone, layer, lw, normalize, {s: shared[s] for s in splits}, args.history,
                       args.batch_size, device, protocol, args.precision)
    stats = X[splits[0]].mean(0), X[splits[0]].std(0).clamp_min(1e-6)
    own = lambda x, take: x if len(take) == len(x) and bool((take == torch.arange(len(x))).all()) else x[take]
    return X, stats, [{s: own(X[s], d.take[s]) for s in X} for d in ds]  # no copy if it heard them all


def stage1(args, backbone, normalize, layer, ds, shared, run, device):
    """The frozen backbone's features -> ridge per subject: each subject's fit on the windows (W, cv
    r, test r, block sums: the head's initialisation and topN) and the fit its baseline is scored by
    (the same, or under --protocol's features), and the windows' z-scoring (mu, sd). Kept in
    stage1.pt, which a resumed run reads."""
    path = os.path.join(run, "stage1.pt")
    if args.resume and os.path.exists(path):
        mu, sd, fits, *scored = load_checkpoint(path)
        return (mu, sd), fits, scored[0] if scored else fits
    STEP[0] = "stage 1"
    lw0 = torch.zeros(len(backbone.encoder.transformer.layers), device=device) if args.layer == "weighted" else None
    _, stats, X = features(args, backbone, lw0, layer, normalize, ds, shared, device)
    fits = [config.stage1(args, x, d, device, stats)[2:] for x, d in zip(X, ds)]
    scored = []
    if config.scoring(args):
        _, stats_p, X = features(args, backbone, lw0, layer, normalize, ds, shared, device, config.scoring(args))
        scored = [[config.stage1(args, x, d, device, stats_p)[2:] for x, d in zip(X, ds)]]
    if RANK == 0:
        save_atomic((*stats, fits, *scored), path)
    return stats, fits, scored[0] if scored else fits


def choose_voxels(args, d, fit, base):
    """A subject's results so far: its voxel sets, the voxels trained on (--roi), the baseline r and
    the baseline's block sums."""
    (_, cv, *_), (_, _, r, *blocks) = fit, base
    sets = ridge.sets(d, cv, args.roi)
    roi = sets[args.roi] if args.roi.startswith("top") else np.intersect1d(
        data.load_roi(args.data, d.name, args.roi, len(d.good)), sets["all"])
    return dict(sets=sets, roi=roi, r={"baseline_r": r.numpy()}, blocks={"baseline": blocks[0]} if blocks else {})


def brain_model(args, backbone, normalize, layer, stats, out, fits, device):
    """The model stage 2 trains: adapters on layers 1..layer (--lora-rank 0: the whole transformer
    up to it) and a head per subject holding its ridge weights on its trained voxels."""
    n_layers, weighted = len(backbone.encoder.transformer.layers), args.layer == "weighted"
    torch.manual_seed(args.seed)  # the adapters' init must not depend on what the caches spared (DataLoaders draw seeds)
    add_adapters(backbone, layer, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, weighted)
    heads = [make_head(W[:, o["roi"]], args.bottleneck) for o, (W, *_) in zip(out, fits)]
    return BrainModel(backbone, heads, *stats, layer, args.history, n_layers if weighted else 0, normalize).to(device)


def stage2(args, model, ds, out, shared, run, device):
    """The adapters (or the transformer) and every head trained together (train_epoch), from the
    run's last checkpoint when resuming; the best epoch by validation r (the mean over subjects) is
    kept. Returns the model, in eval mode."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in trainable if not n.startswith("heads.")], "lr": args.lr},
                             {"params": [p for n, p in trainable if n.startswith("heads.")], "lr": args.head_lr}],
                            weight_decay=0.0)
    steps = -(-len(shared["train"]) // (args.batch_size * args.accum))  # optimiser steps per epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup * steps)))
    state = dict(epoch=0, best_val=-float("inf"), bad_epochs=0, metrics=[], best={n: p.detach().clone() for n, p in trainable})
    ckpt = os.path.join(run, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt):
        ckpt = load_checkpoint(ckpt)
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        model.load_state_dict(ckpt["trainable"], strict=False)
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
    rois = [o["roi"] for o in out]
    net = model if WORLD == 1 else nn.parallel.DistributedDataParallel(  # a subject may have no window in a batch
        model, find_unused_parameters=args.lora_rank == 0 or len(ds) > 1)
    for epoch in range(state["epoch"], args.epochs):
        if state["bad_epochs"] >= args.patience:
            break
        t0, STEP[0] = time.time(), f"stage 2, epoch {epoch + 1}"
        loss = train_epoch(args, net, model, ds, rois, shared["train"], opt, sched, epoch, run, device)
        model.eval()
        Z = window_features(model.features, shared["val"], None, args.batch_size, device, "validation", args.precision)
        val = [r.nanmean().item() for r in heads_r(model, Z, ds, rois, "val", device)]
        state["metrics"].append(dict(epoch=epoch + 1, train_loss=loss, val_r=float(np.mean(val)), lr=opt.param_groups[0]["lr"],
                                     head_lr=opt.param_groups[1]["lr"], seconds=round(time.time() - t0, 2)))
        if len(ds) > 1:
            state["metrics"][-1]["val_r_subjects"] = {d.name: v for d, v in zip(ds, val)}
        better = np.mean(val) > state["best_val"]
        state.update(best_val=max(state["best_val"], float(np.mean(val))), epoch=epoch + 1,
                     bad_epochs=0 if better else state["bad_epochs"] + 1)
        if better:
            state["best"] = {n: p.detach().clone() for n, p in trainable}
        log(f"epoch {epoch + 1}: train loss {loss:.4f}, validation r {np.mean(val):.4f}, {time.time() - t0:.1f} s")
        if RANK == 0:
            save_atomic(dict(opt=opt.state_dict(), sched=sched.state_dict(), rng=torch.get_rng_state(), state=state,
                             trainable={n: p.detach().clone() for n, p in trainable}), os.path.join(run, "checkpoint.pt"))
            save_atomic("".join(json.dumps(m) + "\n" for m in state["metrics"]), os.path.join(run, "metrics.jsonl"))
    model.load_state_dict(state["best"], strict=False)
    if RANK == 0:
        save_atomic(dict(trainable=state["best"], args=vars(args)), os.path.join(run, "adapter.pt"))
    return model.eval()


def train_epoch(args, net, model, ds, rois, windows, opt, sched, epoch, run, device):
    """One pass over the shared training windows in a seeded order, each global batch split among
    the processes (net: the model, or its DistributedDataParallel); returns the mean loss."""
    net.train()
    perm, B = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed + epoch)), args.batch_size
    if 0 < len(perm) % B < WORLD:  # a last batch smaller than the number of processes: left out this epoch
        perm = perm[:len(perm) - len(perm) % B]
    n, losses, t0 = -(-len(perm) // B), [], time.time()  # batches this epoch
    note = lambda: f"loss {losses[-1]:.4f}, {len(losses) * B / (time.time() - t0):.1f} windows/s"
    for i, start in enumerate(cache.progress(range(0, len(perm), B), f"epoch {epoch + 1}", note=note)):
        batch = perm[start:start + B]
        idx = batch[RANK::WORLD]  # this process's share of the global batch
        wave = torch.stack([windows[j][0] for j in idx.tolist()]).to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=uses_bf16(device, args.precision)):
            preds = net(wave)  # every head on the one forward of the shared windows
        loss = subjects_loss(preds, model.heads, ds, rois, idx, args.loss, args.l2, device)
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
        losses.append(loss.item())
    return float(np.mean(losses))


def subjects_loss(preds, heads, ds, rois, idx, kind, l2, device):
    """The loss of one batch of shared windows idx: for each subject, `kind` (loss_fn) over the
    windows it heard (its rows: d.row; a subject that heard none adds nothing), plus l2 times its
    head's squared weights (Li et al.); averaged over subjects, so that each counts once, whatever
    its voxel count."""
    losses = []
    for pred, head, d, roi in zip(preds, heads, ds, rois):
        r = d.row["train"][idx]
        heard = r >= 0  # the windows of this batch that the subject heard
        if heard.any():
            loss = loss_fn(pred[heard].float(), d.Y["train"][r[heard], roi].to(device), kind)
            if l2:
                loss = loss + l2 * sum(p.square().sum() for n, p in head.named_parameters() if n.endswith("weight"))
            losses.append(loss)
    return torch.stack(losses).mean()


def loss_fn(pred, y, kind):
    """mse, or corr: minus the correlation across voxels of each TR, averaged (BrainWavLM)."""
    if kind == "mse":
        return F.mse_loss(pred, y)
    return -ridge.pearson(pred.T, y.T).mean()


def heads_r(model, Z, ds, rois, split, device, block=16384, skip=0):
    """Each subject's r over its trained voxels (rois), from z-scored features Z (shared windows, p);
    the predictions and responses are taken a block of voxels at a time; on the test split, from each
    story's row `skip` on."""
    out = []
    with torch.no_grad():
        for head, d, roi in zip(model.heads, ds, rois):
            *first, last = head if isinstance(head, nn.Sequential) else [head]  # a bottleneck: down, up
            rows = ridge.scored_rows(d, skip) if split == "test" else slice(None)
            h = Z[d.take[split]][rows].to(device)
            for m in first:
                h = m(h)
            out.append(torch.cat([ridge.pearson(F.linear(h, last.weight[j:j + block], last.bias[j:j + block]).float().cpu(),
                                                d.Y[split][rows, roi[j:j + block]]) for j in range(0, len(roi), block)]))
    return out


def refit(args, model, ds, out, shared, device):
    """The tuned model scored twice on the test story: with its own heads (tuned r), and by the
    field's protocol, its features re-extracted and ridge refit (refit r), under --protocol."""
    STEP[0] = "the refit"
    lw = model.layer_weights
    Xs, stats, X = features(args, model.backbone, lw, model.layer, model.normalize, ds, shared, device,
                            splits=("test",) if config.scoring(args) else ("train", "test"))
    if config.scoring(args):
        _, stats, X = features(args, model.backbone, lw, model.layer, model.normalize, ds, shared, device, config.scoring(args))
    tuned = heads_r(model, (Xs["test"] - model.mu.cpu()) / model.sd.cpu(), ds, [o["roi"] for o in out], "test", device,
                    skip=args.test_skip)
    for x, d, o, r in zip(X, ds, out, tuned):
        o["r"]["tuned_r"] = np.full(len(d.good), np.nan, np.float32)
        o["r"]["tuned_r"][o["roi"]] = r.numpy()
        *_, refit_r, o["blocks"]["refit"] = config.stage1(args, x, d, device, stats)
        o["r"]["refit_r"] = refit_r.numpy()


def report(args, run, ds, out):
    """results.json, voxel_r.npz and the results table."""
    tests = {d.name: ridge.summarize(o["r"], o["sets"], d.ceiling, o["blocks"]) for d, o in zip(ds, out)}
    scored = config.protocol(args)
    per = {d.name: dict(subject=d.name, model=args.model, roi=args.roi, n_voxels=int(len(o["roi"])), protocol=scored,
                        test=tests[d.name]) for d, o in zip(ds, out)}
    one = len(ds) == 1
    res = per[ds[0].name] if one else dict(model=args.model, roi=args.roi, protocol=scored, subjects=per)
    save_atomic(json.dumps(res, indent=1), os.path.join(run, "results.json"))
    save_atomic({(k if one else f"{d.name}.{k}"): v for d, o in zip(ds, out) for k, v in o["r"].items()},
                os.path.join(run, "voxel_r.npz"))
    print(ridge.format_table(tests, scored))


def run_folder(args):
    """The run folder: --resume's, --out, or a new name; an existing one is refused without --force.
    The first process decides and tells the others (a new name holds the time)."""
    name = [args.resume or args.out or os.path.join("runs", f"{args.subject.replace(',', '+')}_{args.roi}_"
                                                            f"{args.model}_{time.strftime('%Y%m%d-%H%M%S')}")]
    if WORLD > 1:
        torch.distributed.broadcast_object_list(name)  # rank 0's
    if RANK == 0 and not args.resume and os.path.exists(name[0]) and not args.force and (
            not os.path.isdir(name[0]) or os.listdir(name[0])):
        raise ValueError(f"{name[0]} already exists; use --resume {name[0]} to continue it or --force to overwrite it")
    return name[0]


def main(argv=None):
    args = config.parse(argv)
    with cache.no_cache() if getattr(args, "no_cache", False) else contextlib.nullcontext():
        return brain_tune(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except (torch.OutOfMemoryError, MemoryError) as e:
        sys.exit(f"error: out of memory in {STEP[0]} ({str(e).splitlines()[0][:100]}); try a smaller --batch-size "
                 "or --device cpu; what was finished is kept (the cache, the run folder's last checkpoint)")
