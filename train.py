"""
Brain-tuning: fine-tune a self-supervised speech model so that it predicts fMRI responses.

Stage 1: the frozen backbone turns every delayed-TR window into features, ridge regression with a
per-voxel lambda maps them to every voxel; that is the baseline and the head's initialisation.
Stage 2: LoRA adapters (or the whole transformer) and the head train together; then the tuned
backbone's features are re-extracted and ridge refit, the field's protocol (README, "The method").

    python train.py --subject S01 --roi all     # synthetic dataset, tiny model, a laptop's CPU
    python train.py --data ds003020 --subject UTS01 --recipe brainwavlm
    torchrun --nproc_per_node 2 train.py ...    # data parallel, one process per device
"""
import contextlib
import functools
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torchaudio

import cache
import config
import data
import dist
import guard
import preflight
import ridge
import runfolder
import synthetic
import voxels
from cache import log
from dist import RANK, WORLD
from features import shared_features, window_features
from model import (BrainModel, add_adapters, keep_freed_memory, load_extractor, make_head,
                   tiny_weights)
from objective import (Batches, TrainState, heads_r, optimiser, record_epoch, resume_stage2,
                       selection_r, subjects_loss, targets)

STEP = ["starting"]  # what the run is doing, for an error that cannot be foreseen (out of memory)


# -----------------------------------------------------------------------------
# the method, step by step

def brain_tune(args):
    """Both stages and the results, for the flags in args (config.parse); returns the run
    folder."""
    device = start(args)  # the device, the processes, the quick start's dataset
    names = args.subject.split(",")  # every check made in every process, a refusal ending all:
    run = dist.agree(functools.partial(runfolder.choose, args))
    listings = dist.agree(functools.partial(preflight.check, args, names, device,
                                            textgrids=pretrains_tiny(args)))
    early = None if pretrains_tiny(args) else pretrained(args, run)  # a failed download, now
    if RANK > 0:
        dist.wait()  # the first process fills the caches (the data, tiny, stage 1)
    STEP[0] = "loading the data"
    ds, shared = config.load_subjects(args, names)
    preflight.check_voxels(args, ds)
    extractor = early or pretrained(args, run, shared["train"])
    open_run(args, run, ds, shared, extractor, device)
    fits = stage1(args, extractor.to(device), ds, shared, run, listings)
    if RANK == 0:
        dist.wait()  # the caches are full: the other processes go on
    results = [voxels.choose(args, d, fit, data.roi_path(args.data, d.name))
               for d, fit in zip(ds, fits)]
    if args.epochs > 0:
        model = brain_model(args, extractor, fits, results)
        model = stage2(args, model, ds, results, shared, run)
        evaluate(args, model, ds, results, shared, listings)
        for epoch in config.scored_epochs(args)[:-1]:  # the other epochs --select names
            model.load_state_dict(runfolder.read_epoch(run, epoch), strict=False)
            evaluate(args, model, ds, [r.at(epoch) for r in results], shared, listings)
    if RANK == 0:
        report(args, run, ds, results)
        run = runfolder.finish(run)  # --force's new run in the old one's place
    return run


def start(args):
    """The device and, under torchrun, the process group (dist.init); the synthetic dataset made
    if absent."""
    device = dist.init(args.device, args.precision)
    if device.type == "cpu":
        keep_freed_memory()
    if args.synthetic and not os.path.isdir(args.data) and RANK == 0:
        log(f"making the synthetic dataset in {args.data} (once)")
        with cache.atomic_folder(args.data) as tmp:
            synthetic.make_demo(tmp)
    dist.wait()
    return device


def pretrains_tiny(args):
    """Whether this run pretrains tiny to name phones (on its training stories' TextGrids)."""
    return args.model == "tiny" and args.weights is None and args.tiny_pretrain > 0 \
        and not args.resume


def pretrained(args, run, windows=None):
    """The pretrained model.Extractor: the torchaudio bundle's weights, --weights, tiny's weights
    kept in the run folder (--resume), or tiny pretrained on the training `windows` now (its
    pretraining seeded apart from --seed, which varies what stage 2 draws: runs of several seeds
    share their pretrained model and stage 1)."""
    own = os.path.join(run, "tiny_pretrained.pt")
    weights = own if args.resume and os.path.isfile(own) else args.weights
    if pretrains_tiny(args):  # one tiny for every --seed, as a downloaded model is the same
        STEP[0] = "tiny's pretraining"
        weights = tiny_weights(args.data, windows, args.tiny_pretrain, seed=0)
    return load_extractor(args.model, args.layer, weights, args.seed, args.backbone_dropout,
                          pool=args.pool, augment=config.augment(args))


def open_run(args, run, ds, shared, extractor, device):
    """The run folder, its config.json and tiny's pretrained weights (--resume and eval.py read
    them there); the log's first lines."""
    own = os.path.join(run, "tiny_pretrained.pt")
    if RANK == 0:
        runfolder.make(run)  # and held by this process until the run ends
    if pretrains_tiny(args) and RANK == 0:
        cache.save_atomic(extractor.backbone.state_dict(), own)
    layer = "weighted" if extractor.layer_weights is not None else extractor.layer
    log(f"{'+'.join(d.name for d in ds)}: model {args.model} (recipe {args.recipe or 'none'}), "
        f"layer {layer}, {len(shared['train'])} training windows of {args.history} TRs from "
        f"{len(shared['train'].stories)} stories; run folder {run}")
    how = "bf16 autocast" if dist.uses_bf16(device, args.precision) else "float32"
    log(f"device {device}: the backbone in {how}, the heads and the ridge in float32")
    if args.control != "none":
        log(f"control {args.control}: stage 2 trains on responses whose blocks of "
            f"{args.control_block} TRs are permuted within each story; the test story is real")
    # where its features were computed: eval.py computes there too, reading the same caches
    ran_on = dict(device=str(device), precision=dist.precision_name(device, args.precision))
    if RANK == 0 and not args.resume:
        flags = config.flags_record(args)
        if pretrains_tiny(args):  # the weights the run used (found in its folder by --resume)
            flags["weights"] = os.path.abspath(own)
        versions = dict(torch=torch.__version__, torchaudio=torchaudio.__version__,
                        numpy=np.__version__)
        runfolder.write_config(run, flags, {d.name: d.stories for d in ds},
                               dict(versions, ran_on=ran_on))
    elif RANK == 0:
        runfolder.update_config(run, ran_on=ran_on)


def features_of(args, extractor, ds, shared, protocol=None, splits=("train", "test")):
    """The extractor's features of the shared windows' splits, each subject's rows of them
    (features.Features): the windows pooled, or under a paper's `protocol`."""
    return shared_features(extractor, ds, {s: shared[s] for s in splits}, args.history,
                           batch_size=args.infer_batch, protocol=protocol,
                           precision=args.precision)


def fit_subjects(args, X, ds, listings, device):
    """Each subject's ridge on its rows of features X (features.Features): [ridge.RidgeFit]."""
    settings = config.ridge_settings(args, listings)
    return [ridge.fit_encoding(x, d, settings, device, (X.mu, X.sd))
            for x, d in zip(X.subjects, ds)]


def stage1(args, extractor, ds, shared, run, listings):
    """The frozen backbone's features -> ridge per subject (ridge.Stage1): its fit on the windows
    (the head's initialisation and topN) and the fit its baseline is scored by (the same, or
    under --protocol's features). Kept in stage1.pt, which a resumed run reads."""
    if args.resume and os.path.exists(os.path.join(run, "stage1.pt")):
        return runfolder.read_stage1(run)
    STEP[0] = "stage 1"
    device = next(extractor.parameters()).device
    X = features_of(args, extractor, ds, shared)
    init = baseline = fit_subjects(args, X, ds, listings, device)
    if args.protocol.sliding:
        X = features_of(args, extractor, ds, shared, args.protocol)
        baseline = fit_subjects(args, X, ds, listings, device)
    fits = [ridge.Stage1(a, b) for a, b in zip(init, baseline)]
    if RANK == 0:
        runfolder.save_stage1(run, fits)
    return fits


def brain_model(args, extractor, fits, results):
    """The model stage 2 trains: adapters on layers 1..layer (--lora-rank 0: the whole
    transformer up to it) and a head per subject holding its ridge weights on its trained voxels,
    all made on the backbone's device."""
    device = next(extractor.parameters()).device
    # the adapters' init must not depend on what the caches spared (DataLoaders draw seeds)
    torch.manual_seed(args.seed)
    add_adapters(extractor.backbone, extractor.layer, args.lora_rank, args.lora_alpha,
                 args.lora_dropout, args.lora_targets, weighted=extractor.layer_weights is not None,
                 projection=args.tune == "feature-projection")
    heads = [make_head(f.init.W[:, r.roi].to(device), args.bottleneck)
             for f, r in zip(fits, results)]
    mu, sd = fits[0].init.mu, fits[0].init.sd  # the shared windows' z-scoring
    return BrainModel(extractor, heads, mu.to(device), sd.to(device), args.history,
                      raw=args.head_input == "raw")


# -----------------------------------------------------------------------------
# stage 2: the adapters and the heads trained together

def stage2(args, model, ds, results, shared, run):
    """The adapters (or the transformer) and every head trained together, from the run's last
    checkpoint when resuming; the best epoch by validation r (the mean over subjects) is kept:
    the heads' own (--select val), or a ridge refit's (--select refit: selection_r), where the
    initial state (epoch 0) is a candidate. Returns the model, in eval mode."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt, sched = optimiser(args, trainable, len(shared["train"]))
    state = resume_stage2(args, run, model, opt, sched) or TrainState(
        metrics=[], best={n: p.detach().cpu().clone() for n, p in trainable.items()})
    train = [targets(args, d, "train", r.roi) for d, r in zip(ds, results)]
    val = [targets(args, d, "val", r.roi) for d, r in zip(ds, results)]
    if args.select == "refit" and not state.metrics:  # the pretrained backbone, a candidate
        state.pretrained_val = state.best_val = selection_r(args, model, ds, train, val, shared,
                                                            cached=True)
        log(f"epoch 0 (pretrained): refit validation r {state.pretrained_val:.4f}")
    # parameters a step may leave without a gradient: a subject that heard none of the batch,
    # what the layer read does not use of a whole tuned transformer (rank 0), a dropped layer
    unused = args.lora_rank == 0 or len(ds) > 1 or args.layer_drop > 0
    net = dist.parallel(model, find_unused=unused)
    for epoch in range(state.epoch, args.epochs):
        if state.bad_epochs >= args.patience:
            break
        t0, STEP[0] = time.time(), f"stage 2, epoch {epoch + 1}"
        m = dict(epoch=epoch + 1, **train_epoch(args, net, opt, sched, train, shared, epoch=epoch))
        if args.schedule == "moussa2025":  # stepped once per epoch, as their LambdaLR
            sched.step()
        m.update(validate(args, model, ds, train, val, shared))
        if args.select == "refit" and epoch == 0:
            m["pretrained_refit_val_r"] = state.pretrained_val
        record_epoch(args, state, dict(m, seconds=round(time.time() - t0, 2)), trainable)
        if RANK == 0:  # and an epoch --select names but does not keep, scored after training
            runfolder.save_checkpoint(run, vars(state), opt, sched, trainable,
                                      scored=epoch + 1 in config.scored_epochs(args)[:-1])
    model.load_state_dict(state.best, strict=False)
    if args.select == "refit":
        log(f"kept epoch {state.best_epoch} (refit validation r {state.best_val:.4f}; 0 is the "
            "pretrained backbone)")
    if RANK == 0:
        runfolder.save_adapter(run, state.best, state.best_epoch, config.flags_record(args))
    return model.eval()


def train_epoch(args, net, opt, sched, train, shared, *, epoch):
    """One epoch of stage 2 over the shared training windows in a seeded order; returns its
    metrics: the mean training loss and the learning rates its last optimiser step ran at."""
    model = net.module if WORLD > 1 else net
    device, B = model.mu.device, args.batch_size
    order = torch.randperm(len(shared["train"]), generator=torch.Generator().manual_seed(
        args.seed + epoch))
    if 0 < len(order) % B < WORLD:  # a last batch smaller than the processes: left out
        order = order[:len(order) - len(order) % B]
    cuda = device.type == "cuda"
    batches = torch.utils.data.DataLoader(Batches(shared["train"], order, B, train),
                                          batch_size=None, num_workers=2 if cuda else 0,
                                          pin_memory=cuda)
    # each step's loss written into one tensor: a small tensor kept per step between the step's
    # large freed ones would fragment the heap, +1.6 MB a step at a whole subject's size
    n = len(batches)
    losses = torch.zeros(n, device=device)
    net.train()
    for i, batch in enumerate(cache.progress(batches, f"epoch {epoch + 1}")):
        # forward: the backbone under autocast (bf16 on a GPU that has it), the heads in float32
        with dist.autocast(device, args.precision):
            preds = net(batch.wave.to(device, non_blocking=True))
        loss = subjects_loss(preds, model.heads, batch, args)
        # backward, accumulated over --accum batches (the last group may be short)
        group = min(args.accum, n - i // args.accum * args.accum)
        (loss * batch.share / group).backward()
        losses[i] = loss.detach()
        if (i + 1) % args.accum and i + 1 < n:
            continue
        # clip, step, schedule
        if args.clip > 0:  # 0: no clipping
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        rates = [g["lr"] for g in opt.param_groups]  # the epoch's last step's, logged
        opt.step()
        if args.schedule == "warmup":  # stepped per optimiser step
            sched.step()
        opt.zero_grad(set_to_none=True)
    # one host sync an epoch, not one a step: the losses are checked here, where a non-finite
    # one stops the run with the last epoch's checkpoint intact
    losses = losses.cpu()
    if not torch.isfinite(losses).all():
        step = int(torch.nonzero(~torch.isfinite(losses))[0]) + 1
        raise ValueError(f"the loss became {losses[step - 1].item()} at epoch {epoch + 1}, step "
                         f"{step}; stopped: {runfolder.kept(resume=False)} (try a lower --lr)")
    return dict(train_loss=float(losses.mean()), lr=rates[0], head_lr=rates[1])


def validate(args, model, ds, train, val, shared):
    """The epoch's validation metrics: the mean over subjects of the heads' r on their trained
    voxels (each subject's in val_r_subjects), and with --select refit a ridge refit's."""
    model.eval()
    Z = window_features(model.features, shared["val"], None, model.mu.device,
                        batch_size=args.infer_batch, desc="validation", precision=args.precision)
    val_r = [r.nanmean().item() for r in heads_r(model, Z, val)]
    m = dict(val_r=float(np.mean(val_r)))
    if args.select == "refit":
        m["refit_val_r"] = selection_r(args, model, ds, train, val, shared)
    if len(ds) > 1:
        m["val_r_subjects"] = {d.name: v for d, v in zip(ds, val_r)}
    return m


# -----------------------------------------------------------------------------
# the results

def evaluate(args, model, ds, results, shared, listings):
    """The tuned model scored twice on the test story: with its own heads (tuned r), and by the
    field's protocol, its features re-extracted and ridge refit (refit r), under --protocol."""
    STEP[0] = "the evaluation"
    ex, sliding = model.extractor, args.protocol.sliding
    X = own = features_of(args, ex, ds, shared, splits=("test",) if sliding else ("train", "test"))
    if sliding:
        X = features_of(args, ex, ds, shared, args.protocol)
    test = [targets(args, d, "test", r.roi, args.protocol.test_skip) for d, r in zip(ds, results)]
    Z = model.head_input(own.shared["test"])
    refits = fit_subjects(args, X, ds, listings, model.mu.device)
    for d, res, r, fit in zip(ds, results, heads_r(model, Z, test), refits):
        res.tuned_r = np.full(len(d.good), np.nan, np.float32)
        res.tuned_r[res.roi] = r.numpy()
        res.refit_r, res.refit_blocks = fit.test_r.numpy(), fit.blocks


def report(args, run, ds, results):
    """results.json, voxel_r.npz, blocks.pt and the results table."""
    tests = {d.name: ridge.summarize(r, d.ceiling) for d, r in zip(ds, results)}
    scored = dict(vars(args.protocol), pool=args.pool)
    extra = {} if args.control == "none" else dict(control=dict(kind=args.control,
                                                                block=args.control_block))
    per = {d.name: dict(subject=d.name, model=args.model, roi=args.roi.text,
                        n_voxels=int(len(r.roi)), protocol=scored, **extra, test=tests[d.name])
           for d, r in zip(ds, results)}
    named = config.scored_epochs(args) if args.epochs else []  # --select last or 6,11,21
    for d, r in zip(ds, results) if named else ():
        per[d.name].update(ridge.summarize_epochs(r, d.ceiling, named))
    one = len(ds) == 1
    res = per[ds[0].name] if one else dict(model=args.model, roi=args.roi.text, protocol=scored,
                                           **extra, subjects=per)
    arrays = {(k if one else f"{d.name}.{k}"): v for d, r in zip(ds, results)
              for k, v in r.r().items()}
    blocks = {d.name: dict(baseline=r.baseline_blocks, refit=r.refit_blocks)
              for d, r in zip(ds, results)}
    runfolder.save_results(run, res, arrays, blocks)
    line = dict(scored, control=f"{args.control} (blocks of {args.control_block} TRs)") \
        if extra else scored
    print(ridge.format_table({n: ridge.epoch_rows(p) for n, p in per.items()}, line))


def main(argv=None):
    args = config.parse(argv)
    cache.check_root()  # before --no-cache makes its folder there
    with cache.no_cache() if args.no_cache else contextlib.nullcontext(), runfolder.held():
        try:
            return brain_tune(args)
        except (torch.OutOfMemoryError, MemoryError) as e:  # a CUDA one is no MemoryError
            why = str(e).splitlines()[0][:100]
            raise ValueError(f"out of memory in {STEP[0]} ({why}); try a smaller --batch-size "
                             f"or --device cpu; {runfolder.kept()}") from None
        finally:
            dist.end()


if __name__ == "__main__":
    guard.main_guard(main, kept=runfolder.kept)  # one line for a refusal, an OSError, Ctrl-C
