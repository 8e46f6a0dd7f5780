"""
A run's flags: set (each with its help, the papers' recipes setting their defaults) and checked,
alone and against each other, before anything is read; `parse` resolves them once (--roi as one
named value, voxels.Voxels; --protocol and its settings as another, features.Protocol) and nothing
writes to them after it. What the dataset's listings add, and whether the largest allocations fit
in memory, preflight.py checks, before any forward.

    args = parse(["--subject", "S01", "--roi", "all"])    # checked alone and against each other
    args = parse(["--resume", "runs/RUN", "--epochs", "30"])  # a run's flags, steered
"""
import argparse
import os
import re

import numpy as np
import torch
import torchaudio

import cache
import data
import dist
import guard
import ridge
import runfolder
import synthetic
import voxels
from features import PROTOCOLS, Protocol
from model import BUNDLES, POOLS, TINY, Augment, window_frames

# Moussa et al.'s training stories, as named in their train_stories_25 (dataset.py:121); their
# published loop indexes another list by position (REFERENCE.md section 10): the names are meant
MOUSSA_STORIES = ("souls howtodraw alternateithicatom hangtime swimmingwithastronauts eyespy "
                  "itsabox myfirstdaywiththeyankees legacy theclosetthatateeverything "
                  "haveyoumethimyet thatthingonmyarm undertheinfluence avatar tildeath naked "
                  "fromboyhoodtofatherhood adollshouse odetostepfather adventuresinsayingyes "
                  "sloth exorcism buck inamoment").replace(" ", ",")
# the papers' values, as their authors' code runs them (README: the recipes; docs/training.md
# says where each comes from); the command line still wins
RECIPES = {
    # the laptop demo (the default with the tiny model): a small model needs larger steps
    "demo": dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="qkvo", lr=1e-2,
                 head_lr=1e-4, epochs=8, patience=8),
    "li2024": dict(model="wav2vec2_base", layer="weighted", history=6, lora_rank=0, loss="mse",
                   l2=1e-4, lr=1e-5, head_lr=1e-4),
    "moussa2025": dict(model="hubert_base", layer="12", history=5, lora_rank=0, loss="mse", l2=0.0,
                       lr=5e-5, head_lr=1e-4, batch_size=128, epochs=21, patience=30, warmup=5,
                       schedule="moussa2025", clip=0.0, backbone_dropout=0.0, pool="mean",
                       roi="nc0.4", train_stories=MOUSSA_STORIES, val_stories="stagefright",
                       protocol="moussa2025", select="6,11,21", tune="feature-projection",
                       head_input="raw", precision="fp32"),
    "brainwavlm": dict(model="wavlm_base_plus", layer="9", history=4, lora_rank=4, lora_alpha=4.0,
                       lora_dropout=0.0, lora_targets="qkv", loss="corr", lr=1e-4, head_lr=1e-4,
                       epochs=20, patience=20, warmup=0.0, clip=0.0, select="refit",
                       bottleneck=100, val_stories="fromboyhoodtofatherhood,stagefright",
                       protocol="brainwavlm", frame="first", test_skip=0, lag=1,
                       mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2,
                       layer_drop=0.05, precision="fp32"),
}
# what --resume may change: what is left to do, and how it runs, not what was done
STEERING = ("epochs", "patience", "device", "precision", "batch_size", "accum", "infer_batch",
            "no_cache")


def parser():
    """train.py's flags, each with its help; the data, the model and the evaluation here, stage
    2's and the run's in run_flags."""
    p = argparse.ArgumentParser(description="Brain-tuning of a speech model on fMRI responses "
                                            "to stories.")
    a = p.add_argument
    a("--subject", default="S01", help="subject, e.g. S01 or UTS01; several, comma-separated "
                                       "(S01,S02,S03), tune one backbone with a head for each")
    a("--roi", default="all", help="voxels to train on: all, an ROI name, a .npy file, topN "
                                   "(stage-1 cv r) or ncT (noise ceiling above T, from the test "
                                   "story's repeats; Moussa et al.: nc0.4)")
    a("--data", default=None, help="dataset folder (ds003020 layout); default: the synthetic "
                                   "one, made if absent")
    a("--recipe", choices=sorted(RECIPES), help="set the defaults to one paper's recipe (README)")
    a("--model", default=None, help=f"tiny or {', '.join(BUNDLES)}; default tiny on synthetic "
                                    "data, wavlm_base_plus on a real dataset")
    a("--weights", default=None, help="local state dict for --model instead of the torchaudio "
                                      "download")
    a("--tiny-pretrain", type=int, default=4, help="epochs of tiny's phone pretraining on the "
      "training stories (its stand-in for self-supervised pretraining); 0: random")
    a("--layer", default=None, help="transformer layer read (1-based; default 3/4 of the depth, "
      "9 of 12) or 'weighted' (learned weighted sum of all layers, Li et al.)")
    a("--history", type=int, default=6, help="TRs of audio before each fMRI frame (Li et al.: 6)")
    a("--lag", type=guard.number(int, low=0), default=0, help="TRs from the end of each window to "
      "its fMRI frame: the --history bins cover lags lag..lag+history-1 TRs (BrainWavLM's delays "
      "1-4: --history 4 --lag 1)")
    a("--pool", choices=list(POOLS), default="bins", help="the head's input: bins (the window's "
      "frames averaged in --history TR bins) or mean (the mean of all its frames, Moussa et al.)")
    a("--tr", type=float, default=data.TR, help="seconds per fMRI frame")
    a("--trim-start", type=int, default=data.TRIM_START, help="TRs dropped at the start of each "
                                                              "run")
    a("--sound-start", type=float, default=data.SOUND_START, help="seconds from run start to "
                                                                  "audio start")
    a("--test-stories", default=None, help="comma-separated test stories (default: "
                                           "wheretheressmoke)")
    a("--val-stories", default=None, help="comma-separated validation stories (default: "
                                          "stagefright when present, else the last training story)")
    a("--train-stories", default=None, help="the training stories, comma-separated or a text file "
      "of one story per line (default: every story that is not a test or validation story)")
    a("--protocol", choices=sorted(PROTOCOLS), default="windows", help="the features that stage "
      "1's baseline, the refit and eval.py's fits are scored with: windows (the training input) "
      "or a paper's (moussa2025, brainwavlm: a sliding context, Lanczos to the TRs, delays 1-4)")
    a("--context", type=float, default=None, help="seconds heard before each stride (moussa2025 "
                                                  "16, brainwavlm 3.75)")
    a("--stride", type=float, default=None, help="seconds between the ends of the feature "
                                                 "windows (0.1, 0.25)")
    a("--frame", choices=["last", "first"], default="last", help="the frames kept of each "
      "protocol snippet: last (those of its last stride) or first (its first frame, labelled at "
      "the snippet's end: BrainWavLM's code)")
    a("--delays", default=None, help="TR delays of the protocol's features, comma-separated (the "
                                     "papers: 1,2,3,4)")
    a("--test-skip", type=int, default=None, help="rows left out of each test story's score at "
                                                  "its start (the papers: 40; windows: 0)")
    a("--block", type=int, default=10, help="TRs per block of the test story's bootstrap (the "
                                            "change's interval)")
    a("--cv-folds", type=int, default=None, help="ridge cross-validation folds, each a group of "
      "whole stories (default 5, or one per training story if there are fewer)")
    a("--alphas", default="1e-1,1e8,19", help="ridge lambda grid: first,last,count (log-spaced)")
    run_flags(p.add_argument_group("stage 2 and the run").add_argument)
    return p


def run_flags(a):
    """Stage 2's flags and the run's (a: add_argument of their group)."""
    a("--bottleneck", type=int, default=0, help="head through K units, initialised by rank-K "
                                                "ridge weights")
    a("--lora-rank", type=int, default=4, help="LoRA rank (BrainWavLM: 4); 0 = tune the whole "
                                               "transformer")
    a("--lora-alpha", type=float, default=4.0, help="LoRA alpha; scaling = alpha / rank "
                                                    "(BrainWavLM: 4)")
    a("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input "
                                                      "(BrainWavLM: 0.1)")
    a("--lora-targets", default="qkv", help="projections to adapt, letters of qkvo (BrainWavLM: "
                                            "qkv)")
    a("--backbone-dropout", type=float, default=None, help="the backbone's own dropout "
      "(attention, hidden, projection) in stage 2; default the bundle's (0.1; tiny 0); 0 makes a "
      "CPU step about 1.3x faster (bench.py)")
    a("--layer-drop", type=guard.number(float, low=0, high=1, high_open=True), default=0.0,
      help="LayerDrop in stage 2, as a Hugging Face model in train mode: each layer skipped with "
      "this probability in a step (BrainWavLM's WavLM: 0.05)")
    a("--mask-time-prob", type=guard.number(float, low=0, high=1), default=0.0, help="SpecAugment "
      "in stage 2, as Hugging Face's: spans of --mask-time-length frames after the feature "
      "projection set to zero, about this share of each window (BrainWavLM's WavLM: 0.05)")
    a("--mask-time-length", type=guard.number(int, low=1), default=10, help="frames per span")
    a("--mask-time-min-masks", type=guard.number(int, low=0), default=2, help="spans per window at "
      "least, where --mask-time-prob is above 0")
    a("--tune", choices=["transformer", "feature-projection"], default="transformer", help="what "
      "trains beside the heads: the adapters (or with --lora-rank 0 the transformer), or that and "
      "the feature projection from the CNN to the transformer (Moussa et al.: only the CNN frozen)")
    a("--head-input", choices=["zscored", "raw"], default="zscored", help="what the heads read: "
      "the pooled features z-scored by stage 1's moments, or raw (Moussa et al.), the heads' "
      "weights and bias folded so that they start as the same function")
    a("--loss", choices=["mse", "corr"], default="mse", help="mse (Li et al.) or corr (BrainWavLM)")
    a("--l2", type=float, default=0.0, help="L2 penalty on the head's weights (Li et al.)")
    a("--lr", type=float, default=1e-4, help="learning rate of the adapters (or the transformer)")
    a("--head-lr", type=float, default=1e-4, help="learning rate of the head")
    a("--warmup", type=float, default=1.0, help="epochs of linear learning-rate warm-up")
    a("--schedule", choices=["warmup", "moussa2025"], default="warmup", help="warmup: --warmup "
      "epochs of linear warm-up per step, then constant; moussa2025: per epoch, the backbone's lr "
      "x epoch/5 to epoch 5 then down to 0 at epoch 30, the head's x max(0.8^epoch, 0.1)")
    a("--clip", type=float, default=1.0, help="gradient-norm clipping; 0: none")
    a("--batch-size", type=int, default=16, help="windows per optimiser step (global, across "
                                                 "processes)")
    a("--accum", type=int, default=1, help="batches accumulated per optimiser step")
    a("--infer-batch", type=guard.number(int, low=1), default=16, help="windows, or a protocol's "
      "chunks, forwarded at once where features are extracted (stage 1, validation, the refit, "
      "eval.py): sized for memory apart from --batch-size")
    a("--epochs", type=int, default=20, help="stage-2 epochs; 0 stops after stage 1 (the "
                                             "baseline); with --resume, extends the run")
    a("--patience", type=int, default=3, help="stop after this many epochs without a better "
                                              "validation r")
    a("--select", type=guard.argtype(selection), default="val", help="the epoch kept: val (the "
      "best validation r of the trained heads), refit (of a ridge refit on the training stories' "
      "features, scored on the validation stories; the pretrained backbone a candidate), last, "
      "or epochs, comma-separated (6,11,21: the models after 6, 11 and 21 epochs, each scored on "
      "the test story, the last kept; Moussa et al.); last and a list never stop early")
    a("--control", choices=["none", "permuted"], default="none", help="permuted: stage 2 trains "
      "on each training and validation story's responses with blocks of --control-block TRs "
      "permuted within the story (the permuted-brain control); the test story is always real")
    a("--control-block", type=int, default=10, help="TRs per permuted block of --control "
                                                    "permuted (1: single TRs)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda when available")
    a("--precision", choices=["auto", "fp32"], default="auto", help="auto: the backbone in bf16 "
      "autocast on a GPU, float32 on a CPU; fp32: float32 everywhere (the ridge is always "
      "float32)")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default=None, help="run folder (default runs/<subject>_<roi>_<model>_<time>)")
    a("--resume", default=None, help="continue the run in this folder from its last finished "
      "epoch; only " + ", ".join("--" + k.replace("_", "-") for k in STEERING) + " may be given "
      "with it (the batch's two keep the global batch)")
    a("--force", action="store_true", help="overwrite an existing run folder")
    a("--no-cache", action="store_true", help="keep nothing in $BRAINTUNE_CACHE (default .cache): "
      "responses, audio, features and stage-1 fits are made again and deleted at exit")


def selection(text):
    """--select's text: val, refit, last, or epochs from 1 up, comma-separated and increasing."""
    epochs = [int(x) for x in text.split(",")] if re.fullmatch(r"\d+(,\d+)*", text) else [0]
    if text not in ("val", "refit", "last") and (epochs[0] < 1 or sorted(set(epochs)) != epochs):
        raise ValueError("expected val, refit, last, or epochs from 1 up, comma-separated and "
                         f"increasing (e.g. 6,11,21), not {text!r}")
    return text


def scored_epochs(args):
    """The epochs --select names (a list, or last: --epochs), each scored, the last kept."""
    if args.select in ("val", "refit"):
        return []  # the best is chosen
    return [args.epochs] if args.select == "last" else [int(x) for x in args.select.split(",")]


def augment(args):
    """What the backbone does in stage 2's training mode beside its dropout (model.Augment)."""
    return Augment(args.mask_time_prob, args.mask_time_length, args.mask_time_min_masks,
                   args.layer_drop)


def given_flags(p, argv):
    """{flag's dest: value} of the flags on the command line alone (the defaults left out)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            kw = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse._StoreTrueAction):
                quiet.add_argument(*action.option_strings, action="store_true", **kw)
            else:
                quiet.add_argument(*action.option_strings, type=action.type, **kw)
    return vars(quiet.parse_known_args(argv)[0])


def parse(argv=None):
    """The flags, each checked alone and against the others (the dataset: data.check_dataset)."""
    p = parser()
    first = p.parse_args(argv)
    if first.resume:
        return resumed(p, first.resume, given_flags(p, argv))
    if first.recipe is None and (first.model == "tiny" or (first.model is None and
                                                           first.data is None)):
        first.recipe = "demo"
    if first.recipe:
        p.set_defaults(**RECIPES[first.recipe], recipe=first.recipe)
    args = p.parse_args(argv)
    args.synthetic = args.data is None
    # absolute, so that a run works from anywhere
    args.data = os.path.abspath(args.data or os.path.join(cache.cache_root(), synthetic.SYNTHETIC))
    args.model = args.model or ("tiny" if args.synthetic else "wavlm_base_plus")
    args.resume, args.steered = None, {}
    return resolve(args)


def story_list(value):
    """--train-stories: a text file of one story per line, or stories comma-separated."""
    if os.path.isfile(value):
        with open(value) as f:
            stories = [line.strip() for line in f if line.strip()]
    else:
        stories = [s.strip() for s in value.split(",") if s.strip()]
    if not stories or len(set(stories)) < len(stories):
        raise ValueError(f"--train-stories {value}: expected stories, comma-separated or one a "
                         "line in a file, each named once")
    return stories


def resumed(p, run, given):
    """The flags of the run in folder `run` (its config.json; flags newer than the run take
    today's defaults), with the steering flags given beside --resume (STEERING) in force and
    listed in args.steered; any other flag is refused, as it would change what was done."""
    saved = runfolder.read_config(run, "--resume")["args"]
    changed = sorted(k for k in given if k not in STEERING + ("resume",))
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise ValueError(f"{flag}: given with --resume, it would change the run in {run}; start a "
                         "new run instead (only " + ", ".join("--" + k.replace("_", "-")
                                                              for k in STEERING) + " may steer it)")
    args = argparse.Namespace(**dict(vars(p.parse_args([])), **saved))
    steered = {k: v for k, v in given.items() if k in STEERING and v != saved.get(k)}
    if {"batch_size", "accum"} & set(steered):
        new = given.get("batch_size", args.batch_size) * given.get("accum", args.accum)
        if new != args.batch_size * args.accum:
            raise ValueError(f"--batch-size {given.get('batch_size', args.batch_size)} --accum "
                             f"{given.get('accum', args.accum)}: with --resume the global batch "
                             f"must stay {args.batch_size * args.accum} windows (--batch-size x "
                             "--accum), or the run would not be the same")
    for k, v in steered.items():
        setattr(args, k, v)
    if args.weights and os.path.basename(args.weights) == "tiny_pretrained.pt":
        args.weights = None  # tiny's pretrained weights travel with the run folder
    args.resume, args.force, args.steered = run, False, steered
    return resolve(args)


def resolve(args):
    """The flags' values, from the command line or a run's config.json, resolved in place once:
    the story lists, the lambdas, --roi as voxels.Voxels, --protocol and its settings as one
    features.Protocol; each checked alone and against the others."""
    for k in ("test_stories", "val_stories"):
        if isinstance(getattr(args, k), str):
            setattr(args, k, getattr(args, k).split(","))
    if isinstance(args.train_stories, str):
        args.train_stories = story_list(args.train_stories)
    if isinstance(args.alphas, str):
        args.alphas = lambdas(args.alphas)
    if args.model != "tiny" and args.model not in BUNDLES:
        raise ValueError(f"--model {args.model}: unknown; choose tiny or one of "
                         f"{', '.join(BUNDLES)}")
    depth = architecture(args.model)["encoder_num_layers"]
    if args.layer not in (None, "weighted") and not (args.layer.isdigit() and
                                                     1 <= int(args.layer) <= depth):
        raise ValueError(f"--layer {args.layer}: {args.model} has layers 1..{depth} (or "
                         "'weighted')")
    args.roi = voxels.parse_roi(args.roi)
    if "," in args.subject and args.roi.kind == "file":
        raise ValueError(f"--roi {args.roi.text}: a .npy file holds one subject's voxel indices; "
                         "with several subjects use all, topN or an ROI name found in each "
                         "subject's ROI file")
    args.protocol = protocol(args)
    check_ranges(args)
    return args


def lambdas(text):
    """--alphas first,last,count: the ridge's lambdas, log-spaced."""
    try:
        lo, hi, n = (float(x) for x in text.split(","))
        assert 0 < lo <= hi and n >= 1 and n == int(n)
    except (ValueError, AssertionError):
        raise ValueError(f"--alphas {text}: expected first,last,count with 0 < first <= "
                         "last, e.g. 1e-1,1e8,19") from None
    return np.logspace(np.log10(lo), np.log10(hi), int(n)).tolist()


def protocol(args):
    """--protocol and its settings (--context, --stride, --delays, --test-skip, --frame) as one
    features.Protocol, the settings not given taken from the protocol's own (PROTOCOLS); the
    settings' flags are folded into it and leave args."""
    names = ("context", "stride", "delays", "test_skip")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.protocol == "windows" and args.frame != "last":
        given["frame"] = args.frame
    if args.protocol == "windows" and set(given) - {"test_skip"}:
        raise ValueError(f"--{sorted(set(given) - {'test_skip'})[0]}: a setting of moussa2025 or "
                         "brainwavlm, not of --protocol windows")
    settings = dict(PROTOCOLS[args.protocol], **given, frame=args.frame)
    for k in names + ("frame",):
        delattr(args, k)
    try:
        text = str(settings["delays"]).strip("()[]")
        settings["delays"] = [int(x) for x in text.split(",") if x.strip()]
        assert all(x >= 0 for x in settings["delays"])
        assert settings["delays"] or args.protocol == "windows"
    except (ValueError, AssertionError):
        raise ValueError(f"--delays {given.get('delays')}: expected TR delays, comma-separated "
                         "(e.g. 1,2,3,4)") from None
    return Protocol(args.protocol, args.history, settings.get("context"), settings.get("stride"),
                    settings["delays"], settings["test_skip"], settings["frame"])


def architecture(name):
    """The torchaudio builder's settings of model `name` (no weights loaded)."""
    return TINY if name == "tiny" else getattr(torchaudio.pipelines, BUNDLES[name])._params


def check_ranges(args):
    """Every number in its range, --weights there, --device on this machine."""
    if args.weights and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights}: no such file")
    width = architecture(args.model)["encoder_embed_dim"]
    frames = window_frames(architecture(args.model), round(args.history * args.tr * data.SR))
    for flag, ok, want in (
            ("--history", args.history >= 1, "at least 1"), ("--tr", args.tr > 0, "positive"),
            ("--trim-start", args.trim_start >= 0, "0 or more"),
            ("--block", args.block >= 1, "at least 1"),
            ("--context", (args.protocol.context or 0) >= 0, "0 or more"),
            ("--test-skip", args.protocol.test_skip >= 0, "0 or more"),
            ("--stride", args.protocol.stride is None or args.protocol.stride > 0, "positive"),
            ("--cv-folds", (args.cv_folds or 2) >= 2, "at least 2"),
            ("--bottleneck", args.bottleneck >= 0, "0 (none) or more"),
            ("--lora-rank", args.lora_rank >= 0, "0 or more"),
            ("--lora-rank", args.lora_rank <= width,
             f"at most the layer's width, {width} ({args.model})"),
            ("--lora-alpha", args.lora_alpha > 0, "positive"),
            ("--lora-dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
            ("--lora-targets", set(args.lora_targets) <= set("qkvo") and args.lora_targets,
             "letters of qkvo"),
            ("--backbone-dropout", args.backbone_dropout is None or
             0 <= args.backbone_dropout < 1, "in [0, 1)"),
            ("--l2", args.l2 >= 0, "0 or more"), ("--lr", args.lr > 0, "positive"),
            ("--head-lr", args.head_lr > 0, "positive"),
            ("--warmup", args.warmup >= 0, "0 or more"),
            ("--clip", args.clip >= 0, "0 (none) or more"),
            ("--batch-size", args.batch_size >= dist.WORLD,
             f"at least the number of processes, {dist.WORLD}"),
            ("--accum", args.accum >= 1, "at least 1"), ("--epochs", args.epochs >= 0, "0 or more"),
            ("--patience", args.patience >= 1, "at least 1"),
            ("--control-block", args.control_block >= 1, "at least 1"),
            ("--select", not args.epochs or (scored_epochs(args) or [0])[-1] <= args.epochs,
             f"epochs up to --epochs {args.epochs}"),
            ("--mask-time-length", not args.mask_time_prob or args.mask_time_length <= frames,
             f"at most a window's {frames} frames (--history {args.history})"),
            ("--tiny-pretrain", args.tiny_pretrain >= 0, "0 or more")):
        if not ok:
            name = flag[2:].replace("-", "_")
            value = getattr(args, name) if hasattr(args, name) else getattr(args.protocol, name)
            raise ValueError(f"{flag} {value}: must be {want}")
    if args.device:
        check_device(args.device)


def check_device(name):
    """--device names a device this machine has."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; try cpu, cuda or cuda:1") from None
    count = torch.cuda.device_count()
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= count):
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s); use "
                         "--device cpu")


def flags_record(args):
    """The flags as config.json records them, JSON values that resolve() reads back: --roi as its
    text, the protocol as its flags."""
    out = {k: v for k, v in vars(args).items() if k not in ("steered", "roi", "protocol")}
    p = args.protocol
    return dict(out, roi=args.roi.text, protocol=p.name, context=p.context, stride=p.stride,
                delays=list(p.delays) or None, test_skip=p.test_skip, frame=p.frame)


def timing(args):
    """The run's fMRI timing (--tr, --trim-start, --sound-start) and the training windows' --lag,
    as data's functions take them."""
    return dict(tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start, lag=args.lag)


def load_subjects(args, names):
    """data.prepare under the run's flags: each subject's data (data.Subject), held out on the
    run's test, validation and training stories, and the windows they share."""
    return data.prepare(args.data, names, args.test_stories, args.val_stories,
                        args.train_stories, history=args.history, **timing(args))


def ridge_settings(args, listings):
    """How the run fits every ridge (ridge.Settings); the folds default to 5, or one per training
    story where there are fewer."""
    n_train = min(len(d.stories["train"]) for d in listings)
    folds = args.cv_folds or min(5, n_train)
    if folds < 2:
        raise ValueError(f"{args.data}: ridge's cross-validation needs two training stories or "
                         "more; there is one")
    return ridge.Settings(args.alphas, folds, args.block, args.protocol.test_skip)
