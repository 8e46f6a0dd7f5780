"""
A run's flags: set (each with its help, the papers' recipes setting their defaults), checked (alone,
against the others and against the dataset's listings and file headers, before any costly work:
one sentence naming the flag, and nothing written), and read back from a finished run with what
they imply (its backbones, a subject's data, features and fits) for eval.py.

    args = parse(["--subject", "S01", "--roi", "all"])    # checked alone and against each other
    check(args)                                            # and against the dataset
    args, layer, pretrained, tuned, lw = load_run("runs/RUN")
"""
import argparse
import copy
import json
import os
import re

import numpy as np
import torch
import torchaudio
from scipy.io import wavfile

import cache
import data
import ridge
import synthetic
from model import BUNDLES, PROTOCOLS, TINY, add_adapters, layer_of, load_backbone, load_checkpoint, split_features

# the papers' values (README: Stage 2; References says where each comes from); the command line still wins
RECIPES = {
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
WORLD = int(os.environ.get("WORLD_SIZE", 1))  # processes (torchrun)


def parser():
    """train.py's flags, each with its help; the data, the model and the evaluation here, stage 2's
    and the run's in run_flags."""
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
    a("--val-stories", default=None, help="comma-separated validation stories (default: stagefright when "
                                          "present, else the last training story)")
    a("--protocol", choices=sorted(PROTOCOLS), default="windows", help="the features that stage 1's baseline, "
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
    run_flags(p.add_argument_group("stage 2 and the run").add_argument)
    return p


def run_flags(a):
    """Stage 2's flags and the run's (a: add_argument of their group)."""
    a("--bottleneck", type=int, default=0, help="head through K units, initialised by rank-K ridge weights")
    a("--lora-rank", type=int, default=4, help="LoRA rank (BrainWavLM: 4); 0 = tune the whole transformer")
    a("--lora-alpha", type=float, default=4.0, help="LoRA alpha; scaling = alpha / rank (BrainWavLM: 4)")
    a("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input (BrainWavLM: 0.1)")
    a("--lora-targets", default="qkv", help="projections to adapt, letters of qkvo (BrainWavLM: qkv)")
    a("--backbone-dropout", type=float, default=None, help="the backbone's own dropout (attention, hidden, "
      "projection) in stage 2; default the bundle's (0.1; tiny 0); 0 makes a CPU step about 1.3x faster (bench.py)")
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
    a("--precision", choices=["auto", "fp32"], default="auto", help="auto: the backbone in bf16 autocast on a "
      "GPU, float32 on a CPU; fp32: float32 everywhere (the ridge is always float32)")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default=None, help="run folder (default runs/<subject>_<roi>_<model>_<time>)")
    a("--resume", default=None, help="continue the run in this folder from its last finished epoch")
    a("--force", action="store_true", help="overwrite an existing run folder")
    a("--no-cache", action="store_true", help="keep nothing in $BRAINTUNE_CACHE (default .cache): responses, "
                                              "audio, features and stage-1 fits are made again and deleted at exit")


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
        args.delays, args.test_skip = args.delays or [], args.test_skip or 0  # runs from before --protocol
        return args
    if first.recipe is None and (first.model == "tiny" or (first.model is None and first.data is None)):
        first.recipe = "demo"
    if first.recipe:
        p.set_defaults(**RECIPES[first.recipe], recipe=first.recipe)
    args = p.parse_args(argv)
    args.synthetic = args.data is None
    args.data = os.path.abspath(args.data or os.path.join(cache.cache_root(), synthetic.SYNTHETIC))  # works from anywhere
    args.model = args.model or ("tiny" if args.synthetic else "wavlm_base_plus")
    for k in ("test_stories", "val_stories"):
        setattr(args, k, getattr(args, k).split(",") if isinstance(getattr(args, k), str) else getattr(args, k))
    settle(args)
    check_ranges(args)
    return args


def settle(args):
    """--alphas, --model, --layer, --roi and the protocol's settings, checked and resolved in place."""
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
        protocol = dict(PROTOCOLS[args.protocol], **given)
        protocol["delays"] = [int(x) for x in str(protocol["delays"]).strip("()[]").split(",") if x.strip()]
        assert all(x >= 0 for x in protocol["delays"]) and (protocol["delays"] or args.protocol == "windows")
    except (ValueError, AssertionError):
        raise ValueError(f"--delays {args.delays}: expected TR delays, comma-separated (e.g. 1,2,3,4)") from None
    args.context, args.stride, args.delays, args.test_skip = (protocol.get(k) for k in ("context", "stride", "delays",
                                                                                         "test_skip"))


def check_ranges(args):
    """Every number in its range, --weights there, --device on this machine."""
    if args.weights and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights}: no such file")
    for flag, ok, want in (
            ("--history", args.history >= 1, "at least 1"), ("--tr", args.tr > 0, "positive"),
            ("--trim-start", args.trim_start >= 0, "0 or more"), ("--block", args.block >= 1, "at least 1"),
            ("--context", (args.context or 0) >= 0, "0 or more"), ("--test-skip", args.test_skip >= 0, "0 or more"),
            ("--stride", args.stride is None or args.stride > 0, "positive"),
            ("--cv-folds", (args.cv_folds or 2) >= 2, "at least 2"),
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


def check(args):
    """The flags against the dataset, from listings and headers alone (check_dataset) and each subject's
    ROI file, before anything is loaded. Returns check_dataset's {subject: (voxels, splits)}."""
    found = check_dataset(args.data, args.subject.split(","), args.test_stories, args.val_stories, args.cv_folds,
                       tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start)
    n_train = min(len(train) for _, (_, (train, _, _)) in found.items())
    args.cv_folds = args.cv_folds or min(5, n_train)  # the default: 5 folds, or one per training story
    if args.cv_folds < 2:
        raise ValueError(f"{args.data}: ridge's cross-validation needs two training stories or more; there is one")
    for subj, (voxels, (train, _, test)) in found.items():
        for s in test:
            with data.open_hf5(data.response_path(args.data, subj, s)) as f:
                if f["data"].shape[0] <= args.test_skip:
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


def protocol(args):
    """What scores a run's baseline and refit (--protocol and its settings), as results.json records it."""
    return dict(name=args.protocol, history=args.history, context=args.context, stride=args.stride,
                delays=args.delays, test_skip=args.test_skip)


def scoring(args):
    """The paper's protocol for the features (model.split_features), or None for the windows."""
    return dict(context=args.context, stride=args.stride, delays=args.delays) if args.protocol != "windows" else None


def placeholder(path):
    """A file that datalad (git-annex) has listed but not fetched: a broken link, or a small pointer file."""
    if os.path.islink(path) and not os.path.exists(path):
        return True
    if os.path.isfile(path) and os.path.getsize(path) < 1024:
        with open(path, "rb") as f:
            return b"annex/objects/" in f.read()
    return False


def check_dataset(root, subjects, test_stories=None, val_stories=None, folds=None, **timing):
    """What can be known before reading any data, from listings and file headers alone: each subject
    and its splits, every file there and fetched, audio long enough for its rows, no more folds than
    training stories. Raises ValueError naming the flag or the file. Returns {subject: (voxels,
    (train, val, test))}."""
    out, timing = {}, dict(dict(tr=data.TR, trim_start=data.TRIM_START, sound_start=data.SOUND_START), **timing)
    for name in subjects:
        subj = data.find_subject(root, name)
        train, val, test = data.splits(root, subj, test_stories, val_stories)
        test_stories, val_stories = test, val
        if folds is not None and folds > len(train):
            raise ValueError(f"--cv-folds {folds}: {subj} has {len(train)} training stories, and a fold is whole stories")
        for s in train + val + test:
            for path in (data.response_path(root, subj, s), data.wav_path(root, s)):
                if placeholder(path):
                    raise ValueError(f"{path}: not fetched yet (a datalad placeholder); run `datalad get "
                                     f"{os.path.relpath(path, root)}` in {root}")
            with data.open_hf5(data.response_path(root, subj, s)) as f:
                shape = f["data"].shape if "data" in f else ()
            if len(shape) != 2 or (subj in out and shape[1] != out[subj][0]):
                raise ValueError(f"{data.response_path(root, subj, s)}: 'data' has shape {shape}; expected (TRs, "
                                 f"{out[subj][0] if subj in out else 'voxels'})")
            try:
                sr, wave = wavfile.read(data.wav_path(root, s), mmap=True)
            except (ValueError, OSError) as e:
                raise ValueError(f"{data.wav_path(root, s)}: cannot read as WAV ({e})") from None
            need = data.row_times(shape[0], **timing)[-1] if shape[0] else 0
            if need - len(wave) / sr > timing["tr"]:
                raise ValueError(f"story {s!r}: audio is {len(wave) / sr:.1f} s long but its last fMRI frame needs "
                                 f"audio up to {need:.1f} s (see --tr, --trim-start, --sound-start)")
            out[subj] = (shape[1], (train, val, test))
    return out


# -----------------------------------------------------------------------------
# a finished run, read back

def load_run(run):
    """(args, layer, pretrained backbone, tuned backbone, tuned layer weights) of a run folder."""
    if not os.path.isdir(run):
        raise ValueError(f"{run}: no such run folder")
    for f in ("config.json", "results.json", "stage1.pt"):
        if not os.path.isfile(os.path.join(run, f)):
            raise ValueError(f"{run} is incomplete: {f} is missing (did the run finish?)")
    args = parse(["--resume", run])  # the run's flags, with today's defaults for newer ones
    if not os.path.isdir(args.data):
        raise ValueError(f"{args.data}: the run's dataset (--data in {run}/config.json) is not there")
    own = os.path.join(run, "tiny_pretrained.pt")  # tiny's pretrained weights travel with the run folder
    if args.weights and os.path.basename(args.weights) == "tiny_pretrained.pt" and os.path.isfile(own):
        args.weights = own
    pre, normalize = load_backbone(args.model, args.weights, args.seed)
    n_layers = len(pre.encoder.transformer.layers)
    layer = layer_of(args.layer, n_layers)
    tuned, lw = None, None
    if os.path.isfile(os.path.join(run, "adapter.pt")):
        state = load_checkpoint(os.path.join(run, "adapter.pt"))["trainable"]
        tuned = copy.deepcopy(pre)  # the same pretrained weights, read once
        add_adapters(tuned, layer, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        mine = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        missing = set(mine) - set(tuned.state_dict())
        if missing:
            raise ValueError(f"{run}/adapter.pt does not fit the {args.model} model of its config "
                             f"(e.g. {sorted(missing)[0]})")
        tuned.load_state_dict(mine, strict=False)
        tuned.eval()
        lw = state.get("layer_weights")
    args.normalize = normalize
    args.subjects = args.subject.split(",")  # a multi-subject run: the analyses of one subject use the first
    args.subject = args.subjects[0]
    return args, layer, pre, tuned, lw


def layer_weights(args, backbone, lw=None):
    """The learned layer weights of a weighted-layer run (uniform for the pretrained backbone)."""
    if args.layer != "weighted":
        return None
    return lw if lw is not None else torch.zeros(len(backbone.encoder.transformer.layers))


def load_subjects(args, names):
    """data.prepare under the run's flags: each subject's data (data.Subject), held out on the run's
    test and validation stories, and the windows they share."""
    return data.prepare(args.data, names, args.test_stories, args.val_stories, history=args.history, tr=args.tr,
                        trim_start=args.trim_start, sound_start=args.sound_start)


def load_subject(args, name):
    """One subject's data (data.Subject)."""
    return load_subjects(args, [name])[0][0]


def stage1_cv(run):
    """The run's stage-1 cross-validated r of its first subject: what chooses the voxel sets."""
    return load_checkpoint(os.path.join(run, "stage1.pt"))[2][0][1]


def features(args, layer, backbone, lw, d, protocol=None):
    """{"train", "test"}: this backbone's features of one subject's rows, (rows, p): its windows, or,
    with a protocol (config.scoring), a paper's sliding context, Lanczos and delays."""
    return split_features(args.model, backbone, layer, layer_weights(args, backbone, lw), args.normalize,
                          {s: d.windows[s] for s in ("train", "test")}, args.history, args.batch_size,
                          torch.device("cpu"), protocol)


def stage1(args, X, d, device=torch.device("cpu"), stats=None):
    """ridge.stage1 with the run's lambdas, folds and blocks, scored from the run's --test-skip row."""
    return ridge.stage1(X, d, args.alphas, args.cv_folds, args.block, device, stats, args.test_skip)


def fit(args, layer, backbone, lw, d):
    """Stage 1 on one subject with this backbone, under the run's protocol: (mu, sd, W, cv r, test r,
    the test story's block sums)."""
    return stage1(args, features(args, layer, backbone, lw, d, scoring(args)), d)
