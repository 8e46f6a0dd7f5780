"""
The pre-flight: every flag against what the dataset's listings and file headers tell, and against
memory, before anything is read or computed. A mistake costs a second, not the hour of loading and
stage 1 it would otherwise come after.

    listings = check(args, ["UTS01"], device)    # [Listing], or one ValueError naming flag or file
"""
import operator
import os
from dataclasses import dataclass

import numpy as np
import torch

import config
import data
import dist
import guard
import model
import ridge
import textgrid
import voxels

MIN_ROWS = 3  # test rows a score needs: a correlation of fewer is +-1 or undefined


def check(args, names, device, *, textgrids=False):
    """The run's flags against the listings and headers of subjects `names` (list_subjects) and
    against memory (check_sizes); returns the listings (textgrids: tiny's pretraining needs the
    training TextGrids)."""
    listings = list_subjects(args, names, textgrids=textgrids)
    check_sizes(args, listings, device)
    check_blocks(args.block, listings, args.protocol.test_skip)
    check_control(args, listings)
    check_grid(args, listings, device)
    return listings


def check_voxels(args, ds):
    """--roi topN and ncT against each subject's usable voxels, once they are known."""
    for d in ds:
        if args.roi.kind == "top" and args.roi.n > d.good.sum():
            raise ValueError(f"--roi {args.roi.text}: {d.name} has {d.good.sum()} usable voxels")
        if args.roi.kind == "nc" and not (d.good & (d.ceiling > args.roi.threshold)).any():
            raise ValueError(f"--roi {args.roi.text}: no usable voxel of {d.name} has a noise "
                             f"ceiling above {args.roi.threshold:g}")


def list_subjects(args, names, *, textgrids=False):
    """check_dataset under the run's flags: a Listing per subject, or one ValueError."""
    return check_dataset(args.data, names, test_stories=args.test_stories,
                         val_stories=args.val_stories, folds=args.cv_folds,
                         timing=config.timing(args), test_skip=args.protocol.test_skip,
                         roi=args.roi, textgrids=textgrids, train_stories=args.train_stories)


# -----------------------------------------------------------------------------
# the dataset: listings and headers

@dataclass
class Listing:
    """One subject as the pre-flight found it, from listings and file headers alone."""
    name: str  # UTS01, S01 ...
    voxels: int  # columns of its responses
    stories: dict  # {split: [story]}
    rows: dict  # {story: TRs}
    seconds: dict  # {story: seconds of audio}


def placeholder(path):
    """A file that datalad (git-annex) has listed but not fetched: a broken link, or a small
    pointer file."""
    if os.path.islink(path) and not os.path.exists(path):
        return True
    if os.path.isfile(path) and os.path.getsize(path) < 1024:
        with open(path, "rb") as f:
            return b"annex/objects/" in f.read()
    return False


@dataclass
class Header:
    """One story as its files' headers tell it."""
    rows: int  # TRs of its responses
    voxels: int  # columns of its responses
    seconds: float  # of audio


def story_header(root, subj, story, timing):
    """One story's Header, from its hf5's and wav's headers; its frames checked to lie within the
    audio."""
    for path in (data.response_path(root, subj, story), data.wav_path(root, story)):
        if placeholder(path):
            raise ValueError(f"{path}: not fetched yet (a datalad placeholder); run `datalad get "
                             f"{os.path.relpath(path, root)}` in {root}")
    with voxels.open_hf5(data.response_path(root, subj, story)) as f:
        shape = f["data"].shape if "data" in f else ()
    if len(shape) != 2 or not all(shape):
        raise ValueError(f"{data.response_path(root, subj, story)}: 'data' has shape {shape}; "
                         "expected (TRs, voxels), neither 0")
    sr, wave = data.open_wav(data.wav_path(root, story))
    seconds = len(wave) / sr
    if shape[0]:
        times = data.row_times(shape[0], **timing)
        if times[-1] - seconds > timing["tr"]:
            raise ValueError(f"story {story!r}: audio is {seconds:.1f} s long but its last fMRI "
                             f"frame needs audio up to {times[-1]:.1f} s (see --tr, --trim-start, "
                             "--sound-start)")
        if times[0] < 0:
            raise ValueError(data.before_audio(story, times[0], timing.get("lag", 0)))
    return Header(shape[0], shape[1], seconds)


def check_dataset(root, subjects, *, test_stories=None, val_stories=None, folds=None, timing=None,
                  test_skip=0, roi=voxels.parse_roi("all"), textgrids=False, train_stories=None):
    """What can be known before reading any data, from listings and file headers alone: each
    subject and its splits (train_stories each a training story of it), every file there and
    fetched, its frames within its audio, no more folds than training stories, test stories longer
    than test_skip rows, the voxels of `roi` (voxels.Voxels) in each subject (topN within its
    voxels, an ROI in its file, ncT: one test story, with its repeats), and with textgrids the
    training stories' TextGrids (tiny's pretraining). Raises ValueError naming the flag or the
    file. Returns a Listing per subject."""
    timing = dict(dict(tr=data.TR, trim_start=data.TRIM_START, sound_start=data.SOUND_START),
                  **(timing or {}))
    out = []
    for name in subjects:
        subj = data.find_subject(root, name)
        stories = data.splits(root, subj, test_stories, val_stories, train_stories)
        train, val, test = (stories[k] for k in ("train", "val", "test"))
        test_stories, val_stories = test, val  # the first subject's, for every subject
        if folds is not None and folds > len(train):
            raise ValueError(f"--cv-folds {folds}: {subj} has {len(train)} training stories, and a "
                             "fold is whole stories")
        rows, seconds, n_voxels = {}, {}, None
        for s in train + val + test:
            h = story_header(root, subj, s, timing)
            if n_voxels is not None and h.voxels != n_voxels:
                raise ValueError(f"{data.response_path(root, subj, s)}: 'data' has {h.voxels} "
                                 f"voxels; the subject's other stories have {n_voxels}")
            rows[s], seconds[s], n_voxels = h.rows, h.seconds, h.voxels
        for s in test:
            if rows[s] - test_skip < MIN_ROWS:
                raise ValueError(f"--test-skip {test_skip}: the test story {s!r} of {subj} has "
                                 f"{rows[s]} rows, leaving {max(rows[s] - test_skip, 0)} to score "
                                 f"(a score needs {MIN_ROWS} or more)")
        if len(test) == 1:  # its repeats (the noise ceiling's), if any, of its shape
            with voxels.open_hf5(data.response_path(root, subj, test[0])) as f:
                voxels.repeats(f, data.response_path(root, subj, test[0]))
        if roi.kind == "top" and roi.n > n_voxels:
            raise ValueError(f"--roi {roi.text}: {subj} has {n_voxels} voxels")
        if roi.kind == "nc":
            check_repeats(root, subj, test, roi)
        elif roi.kind != "top":
            voxels.load_roi(data.roi_path(root, subj), subj, roi, n_voxels)
        for s in train if textgrids else ():
            if not os.path.isfile(data.textgrid_path(root, s)):
                raise ValueError(f"{data.textgrid_path(root, s)}: no such file; tiny's phone "
                                 "pretraining reads the training stories' TextGrids "
                                 "(--tiny-pretrain 0 uses random weights, --weights PATH your "
                                 "own)")
            textgrid.read_phones(data.textgrid_path(root, s))  # read whole, in order
        out.append(Listing(subj, n_voxels, stories, rows, seconds))
    return out


def check_repeats(root, subj, test, roi):
    """--roi ncT needs one test story whose hf5 holds its repeats (the noise ceiling's input)."""
    if len(test) != 1:
        raise ValueError(f"--roi {roi.text}: the noise ceiling comes from one test story's "
                         f"repeats; there are {len(test)} test stories ({', '.join(test)})")
    path = data.response_path(root, subj, test[0])
    with voxels.open_hf5(path) as f:
        if "individual_repeats" not in f:
            raise ValueError(f"--roi {roi.text}: {path} has no 'individual_repeats' (the test "
                             "story's repeats, from which the noise ceiling comes); choose another "
                             "--roi")


# -----------------------------------------------------------------------------
# will it fit? the largest allocations, estimated from the flags and the listings

def free_memory(device):
    """Bytes free for the run: the device's free memory on a GPU, MemAvailable on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return guard.available_memory()


def forward_bytes(model, batch, seconds, training):
    """A lower estimate of the memory one forward of `batch` waves of `seconds` s holds at once
    (backward too, with training): the CNN front end's first output, and in each transformer layer
    its hidden states and attention scores. Estimates err low, so that a run is refused only when
    it clearly cannot fit."""
    arch = config.architecture(model)
    samples = seconds * data.SR
    (channels, _, first), *_ = arch["extractor_conv_layer_config"]
    hop = float(np.prod([s for _, _, s in arch["extractor_conv_layer_config"]]))
    frames, dim, heads = samples / hop, arch["encoder_embed_dim"], arch["encoder_num_heads"]
    cnn = batch * samples / first * channels * 4  # (batch, channels, samples / stride) float32
    layer = batch * (frames * dim * 4 + heads * frames ** 2 * 4)  # hidden states, scores
    kept = arch["encoder_num_layers"] if training else 1  # kept for the backward pass
    return cnn + layer * kept


@dataclass
class Need:
    """One allocation held at a stage's peak, estimated from the flags and the listings."""
    what: str  # named in a refusal
    nbytes: float
    flags: tuple  # the flags that make it smaller


def parameter_counts(args):
    """The run's backbone with its adapters, built on the meta device (no memory spent): its
    parameters, all and trainable."""
    with torch.device("meta"):
        backbone = model.build_backbone(args.model)
        depth = len(backbone.encoder.transformer.layers)
        model.add_adapters(backbone, model.layer_of(args.layer, depth), args.lora_rank,
                           args.lora_alpha, args.lora_dropout, args.lora_targets,
                           weighted=args.layer == "weighted")
    params = list(backbone.parameters())
    return sum(q.numel() for q in params), sum(q.numel() for q in params if q.requires_grad)


def ridge_bytes(n, p, folds):
    """fit_ridge's working set on n rows of p features: the rows, each fold's eigenvectors and
    held-out rows, the float64 Gram matrices, and a batch of voxels (about 256 MB)."""
    return 4 * n * p + folds * 4 * (p * p + min(n / folds, p) * p) + 3 * 8 * p * p + 2 ** 28


def check_sizes(args, listings, device):
    """The flags against the sizes the listings give, before any forward: --bottleneck within
    the features and the voxels, --history within the shortest training story (refused
    outright), and whether each stage's largest allocations (stage_needs) fit where they live.
    One sentence naming the stage, the largest parts, the free memory and the flags to change."""
    rows = training_rows(listings)
    if args.history > min(rows.values()):
        raise ValueError(f"--history {args.history}: longer than the shortest training story "
                         f"({min(rows.values())} TRs); choose at most {min(rows.values())}")
    p, n_voxels = head_input(args), min(d.voxels for d in listings)
    if args.bottleneck > min(p, n_voxels):
        raise ValueError(f"--bottleneck {args.bottleneck}: larger than the features ({p}) or the "
                         f"voxels ({n_voxels}); choose at most {min(p, n_voxels)}")
    for stage, needs in stage_needs(args, listings, device).items():
        on = device if stage != "the host" else torch.device("cpu")
        free, need = free_memory(on), sum(x.nbytes for x in needs)
        if need > free:
            big = [x for x in sorted(needs, key=operator.attrgetter("nbytes"), reverse=True)
                   if x.nbytes >= need / 10][:3]  # the parts that matter
            parts = ", ".join(f"{x.what} {x.nbytes / 2 ** 30:.1f} GB" for x in big)
            flags = " or ".join(dict.fromkeys(f for x in big for f in x.flags))
            keep = " (--batch-size B/N --accum N keeps the global batch of B)" * (
                "--batch-size" in flags)
            bf16 = ", or let the backbone run in bf16 (--precision auto)" * (
                on.type == "cuda" and args.precision == "fp32")
            raise ValueError(f"{' or '.join(big[0].flags)}: {stage} would need about "
                             f"{need / 2 ** 30:.1f} GB at once on {on} ({parts}) and it has "
                             f"{free / 2 ** 30:.1f} GB free; make {flags} smaller{keep}{bf16}")


def training_rows(listings):
    """{story: rows} of the shared training windows, however many subjects heard each story."""
    rows = {}
    for d in listings:
        for s in d.stories["train"]:
            rows[s] = max(rows.get(s, 0), d.rows[s])
    return rows


def head_input(args):
    """p, the features a head reads: the layer's width in each TR bin, or once (--pool mean)."""
    dim = config.architecture(args.model)["encoder_embed_dim"]
    return dim if args.pool == "mean" else args.history * dim


def stage_needs(args, listings, device):
    """{where: [Need]}: what each stage holds at once where it lives. Stage 1: the backbone, a
    batch forwarded, the ridge; stage 2: the backbone, its trainable part's gradients and Adam
    moments, every subject's head with its own, a training batch's activations; the host: the
    training features and stage 1's weights, the heads' best-epoch and checkpoint copies (on a
    CPU, one memory holds all)."""
    rows, p = training_rows(listings), head_input(args)
    n, window = sum(rows.values()), args.history * args.tr
    voxels = sum(d.voxels for d in listings)
    heads = 4 * sum(min(args.bottleneck, p) * (p + d.voxels) if args.bottleneck else p * d.voxels
                    for d in listings)
    everything, trainable = parameter_counts(args)
    backbone = Need("the backbone", 4 * everything, ("--model",))
    batch = min(args.infer_batch, n)
    stage1 = [backbone, Need(f"{batch} windows forwarded", forward_bytes(args.model, batch, window,
                                                                        False), ("--infer-batch",)),
              Need("the ridge", ridge_bytes(n, p, args.cv_folds or 5), ("--history",))]
    if args.protocol.sliding:
        chunk = args.protocol.context + args.protocol.stride
        stage1.append(Need(f"{args.infer_batch} chunks of {chunk:g} s forwarded", forward_bytes(
            args.model, args.infer_batch, chunk, False), ("--infer-batch", "--context")))
    host = [Need("the training windows' features", 4 * n * p, ("--history",)),
            Need("stage 1's ridge weights", 4 * p * voxels * (1 + args.protocol.sliding),
                 ("--roi",))]
    share = max(min(args.batch_size, n) // dist.WORLD, 1)  # each process's part of the batch
    stage2 = [backbone, Need("the tuned weights' gradients and Adam moments", 12 * trainable,
                             ("--lora-rank",)),
              Need(f"{len(listings)} head(s) with gradients and Adam moments", 4 * heads,
                   ("--roi", "--bottleneck")),
              Need(f"a training batch of {share} windows", forward_bytes(
                  args.model, share, window, True), ("--batch-size",))] if args.epochs else []
    host2 = [Need("the heads' best-epoch and checkpoint copies", 2 * heads, ("--roi",))]
    if device.type == "cpu":  # one memory for both
        return {"stage 1": stage1 + host, "stage 2": stage2 + host[1:] + host2}
    return {"stage 1": stage1, "stage 2": stage2,
            "the host": host + (host2 if args.epochs else [])}


# -----------------------------------------------------------------------------
# the ranges that depend on the data: blocks, the control's blocks, the lambda grid

def check_blocks(block, listings, skip, *, flag="--block", whole=False):
    """--block against each subject's test rows scored (from row `skip` of each test story): two
    blocks or more, the bootstrap's (a story's last block may be short) or, whole, the permutation
    test's (whole blocks of the scored rows, eval.py --significance)."""
    for d in listings:
        scored = [d.rows[s] - skip for s in d.stories["test"]]
        n = sum(scored) // block if whole else sum(-(-r // block) for r in scored)
        if n < 2:
            most = sum(scored) // 2 if whole else max(scored) - 1
            test = "permutation test" if whole else "bootstrap"
            raise ValueError(f"{flag} {block}: the test rows of {d.name} ({sum(scored)} scored) "
                             f"make {n} block(s); the {test} needs two or more (choose {flag} "
                             f"{most} or less)")


def check_control(args, listings):
    """--control-block with --control permuted: some training or validation story has two blocks
    of it, or nothing would be permuted and the control would be the run itself."""
    if args.control == "none":
        return
    longest = max(d.rows[s] for d in listings for k in ("train", "val") for s in d.stories[k])
    if args.control_block >= longest:
        raise ValueError(f"--control-block {args.control_block}: no training or validation story "
                         f"has two blocks of it (the longest has {longest} TRs), so nothing would "
                         f"be permuted; choose at most {longest - 1}")


def grid_bytes(n_lambdas, p, voxels):
    """The memory ridge.fit_ridge takes per lambda at once, for p features and `voxels` solved at
    once: 1 / (e + lambda) as it is made, and the last fold's, about four (lambdas, p) arrays;
    the scores, covariances, variances and the score's temporaries, about five (lambdas, voxels);
    float32. Measured (peak resident memory, 72 rows, 4 folds): 100000 lambdas with p 64, 384 and
    1536 features and 2000, 90 and 90 voxels took 4.18, 0.80 and 2.71 GB (this: 4.10, 0.79, 2.64).
    """
    return n_lambdas * 4 * (4 * p + 5 * voxels)


def check_grid(args, listings, device):
    """--alphas: the lambda grid's share of the ridge (grid_bytes) against the free memory, for
    each subject's ridge on the windows and under --protocol."""
    dim = config.architecture(args.model)["encoder_embed_dim"]
    widths = {dim if args.pool == "mean" else args.history * dim, len(args.protocol.delays) * dim}
    need = 0
    for d in listings:
        n = sum(d.rows[s] for s in d.stories["train"])  # the training rows, and their folds
        folds = args.cv_folds or min(5, len(d.stories["train"]))
        for p in widths - {0}:
            batch = min(d.voxels, ridge.voxels_at_once(n, p, folds))
            need = max(need, grid_bytes(len(args.alphas), p, batch))
    free = free_memory(device)
    if need > free:
        raise ValueError(f"--alphas: a grid of {len(args.alphas)} lambdas needs about "
                         f"{guard.size(need)} at once in the ridge and {device} has "
                         f"{guard.size(free)} free; use fewer lambdas (the default is 19)")
