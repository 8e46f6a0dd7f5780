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
from guard import number
from model import BUNDLES, POOLS, TINY

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
                       lr=5e-5, head_lr=1e-4, batch_size=128, epochs=30, patience=30, warmup=5,
                       schedule="moussa2025", clip=0.0, backbone_dropout=0.0, pool="mean",
                       roi="nc0.4", train_stories=MOUSSA_STORIES, val_stories="stagefright",
                       protocol="moussa2025"),
    "brainwavlm": dict(model="wavlm_base_plus", layer="9", history=4, lora_rank=4, lora_alpha=4.0,
                       lora_dropout=0.1, lora_targets="qkv", loss="corr", lr=1e-4, head_lr=1e-4,
                       epochs=20, patience=20, warmup=0.0, clip=0.0, select="refit",
                       bottleneck=100, val_stories="fromboyhoodtofatherhood,stagefright",
                       protocol="brainwavlm", frame="first", test_skip=0),
}
# what --resume may change: what is left to do, and how it runs, not what was done
STEERING = ("epochs", "patience", "device", "precision", "batch_size", "accum", "no_cache")


RATE = number(float, low=0, low_open=True)  # a learning rate
DROPOUT = number(float, low=0, high=1, high_open=True)
MAX_LAMBDAS = 10 ** 6  # a finer grid than this is no grid: its memory is checked (preflight)


def parser():
    """train.py's flags, each with its help and each number's range (guard.number); the data, the
    model and the evaluation here, stage 2's and the run's in run_flags."""
    p = guard.Parser(description="Brain-tuning of a speech model on fMRI responses to stories.")
    a = p.add_argument
    a("--subject", default="S01", help="subject, e.g. S01 or UTS01; several, comma-separated "
                                       "(S01,S02,S03), tune one backbone with a head for each")
    a("--roi", default="all", help="voxels to train on: all, an ROI name, a .npy file (voxel "
      "indices, or a mask of the voxel count: boolean or 0/1), topN (stage-1 cv r) or ncT (noise "
      "ceiling above T, from the test story's repeats; Moussa et al.: nc0.4)")
    a("--data", default=None, help="dataset folder (ds003020 layout); default: the synthetic "
                                   "one, made if absent")
    a("--drop-nonfinite-voxels", action="store_true", help="leave out the voxels whose responses "
      "hold NaN or inf in some story (without it such a file is refused, its rows named)")
    a("--recipe", choices=sorted(RECIPES), help="set the defaults to one paper's recipe (README)")
    a("--model", default=None, help=f"tiny or {', '.join(BUNDLES)}; default tiny on synthetic "
                                    "data, wavlm_base_plus on a real dataset")
    a("--weights", default=None, help="local state dict for --model instead of the torchaudio "
                                      "download")
    a("--tiny-pretrain", type=number(int, low=0), default=4, help="epochs of tiny's phone "
      "pretraining on the training stories (its stand-in for self-supervised pretraining); 0: "
      "random")
    a("--layer", default=None, help="transformer layer read (1-based; default 3/4 of the depth, "
      "9 of 12) or 'weighted' (learned weighted sum of all layers, Li et al.)")
    a("--history", type=number(int, low=1), default=6, help="TRs of audio before each fMRI frame "
                                                           "(Li et al.: 6)")
    a("--pool", choices=list(POOLS), default="bins", help="the head's input: bins (the window's "
      "frames averaged in --history TR bins) or mean (the mean of all its frames, Moussa et al.)")
    a("--tr", type=number(float, low=0, low_open=True), default=data.TR, help="seconds per fMRI "
                                                                             "frame")
    a("--trim-start", type=number(int, low=0), default=data.TRIM_START, help="TRs dropped at the "
                                                                            "start of each run")
    a("--sound-start", type=number(float), default=data.SOUND_START, help="seconds from run start "
                                                                         "to audio start")
    a("--test-stories", default=None, help="comma-separated test stories (default: "
                                           "wheretheressmoke)")
    a("--val-stories", default=None, help="comma-separated validation stories (default: "
                                          "stagefright when present, else the last training story)")
    a("--train-stories", default=None, help="the training stories, comma-separated or a text file "
      "of one story per line (default: every story that is not a test or validation story)")
    a("--protocol", choices=sorted(PROTOCOLS), default="windows", help="the features that stage "
      "1's baseline, the refit and eval.py's fits are scored with: windows (the training input) "
      "or a paper's (moussa2025, brainwavlm: a sliding context, Lanczos to the TRs, delays 1-4)")
    a("--context", type=number(float, low=0), default=None, help="seconds heard before each "
                                                                "stride (moussa2025 16, "
                                                                "brainwavlm 3.75)")
    a("--stride", type=number(float, low=0, low_open=True), default=None, help="seconds between "
      "the ends of the feature windows (0.1, 0.25)")
    a("--frame", choices=["last", "first"], default="last", help="the frames kept of each "
      "protocol snippet: last (those of its last stride) or first (its first frame, labelled at "
      "the snippet's end: BrainWavLM's code)")
    a("--delays", default=None, help="TR delays of the protocol's features, comma-separated (the "
                                     "papers: 1,2,3,4)")
    a("--test-skip", type=number(int, low=0), default=None, help="rows left out of each test "
      "story's score at its start (the papers: 40; windows: 0)")
    a("--block", type=number(int, low=1), default=10, help="TRs per block of the test story's "
                                                          "bootstrap (the change's interval)")
    a("--cv-folds", type=number(int, low=2), default=None, help="ridge cross-validation folds, "
      "each a group of whole stories (default 5, or one per training story if there are fewer)")
    a("--alphas", type=guard.argtype(lambdas), default="1e-1,1e8,19", help="ridge lambda grid: "
      "first,last,count (log-spaced)")
    run_flags(p.add_argument_group("stage 2 and the run").add_argument)
    return p


def run_flags(a):
    """Stage 2's flags and the run's (a: add_argument of their group)."""
    a("--bottleneck", type=number(int, low=0), default=0, help="head through K units, "
                                                              "initialised by rank-K ridge weights")
    a("--lora-rank", type=number(int, low=0), default=4, help="LoRA rank (BrainWavLM: 4); 0 = "
                                                             "tune the whole transformer")
    a("--lora-alpha", type=number(float, low=0, low_open=True), default=4.0, help="LoRA alpha; "
      "scaling = alpha / rank (BrainWavLM: 4)")
    a("--lora-dropout", type=DROPOUT, default=0.1, help="dropout on the adapters' input "
                                                       "(BrainWavLM: 0.1)")
    a("--lora-targets", default="qkv", help="projections to adapt, letters of qkvo (BrainWavLM: "
                                            "qkv)")
    a("--backbone-dropout", type=DROPOUT, default=None, help="the backbone's own dropout "
      "(attention, hidden, projection) in stage 2; default the bundle's (0.1; tiny 0); 0 makes a "
      "CPU step about 1.3x faster (bench.py)")
    a("--loss", choices=["mse", "corr"], default="mse", help="mse (Li et al.) or corr (BrainWavLM)")
    a("--l2", type=number(float, low=0), default=0.0, help="L2 penalty on the head's weights (Li "
                                                          "et al.)")
    a("--lr", type=RATE, default=1e-4, help="learning rate of the adapters (or the transformer)")
    a("--head-lr", type=RATE, default=1e-4, help="learning rate of the head")
    a("--warmup", type=number(float, low=0), default=1.0, help="epochs of linear learning-rate "
                                                              "warm-up")
    a("--schedule", choices=["warmup", "moussa2025"], default="warmup", help="warmup: --warmup "
      "epochs of linear warm-up per step, then constant; moussa2025: per epoch, the backbone's lr "
      "x epoch/5 to epoch 5 then down to 0 at epoch 30, the head's x max(0.8^epoch, 0.1)")
    a("--clip", type=number(float, low=0), default=1.0, help="gradient-norm clipping; 0: none")
    a("--batch-size", type=number(int, low=1), default=16, help="windows per optimiser step "
                                                               "(global, across processes)")
    a("--accum", type=number(int, low=1), default=1, help="batches accumulated per optimiser step")
    a("--epochs", type=number(int, low=0), default=20, help="stage-2 epochs; 0 stops after stage "
      "1 (the baseline); with --resume, extends the run")
    a("--patience", type=number(int, low=1), default=3, help="stop after this many epochs "
                                                            "without a better validation r")
    a("--select", choices=["val", "refit"], default="val", help="the epoch kept: val (the best "
      "validation r of the trained heads) or refit (of a ridge refit on the training stories' "
      "features, scored on the validation stories; the pretrained backbone a candidate)")
    a("--control", choices=["none", "permuted"], default="none", help="permuted: stage 2 trains "
      "on each training and validation story's responses with blocks of --control-block TRs "
      "permuted within the story (the permuted-brain control); the test story is always real")
    a("--control-block", type=number(int, low=1), default=10, help="TRs per permuted block of "
                                                                  "--control permuted (1: single "
                                                                  "TRs)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda when available")
    a("--precision", choices=["auto", "fp32"], default="auto", help="auto: the backbone in bf16 "
      "autocast on a GPU, float32 on a CPU; fp32: float32 everywhere (the ridge is always "
      "float32)")
    a("--seed", type=number(int, low=0, high=2 ** 32 - 1), default=0, help="random seed")
    a("--out", default=None, help="run folder (default runs/<subject>_<roi>_<model>_<time>)")
    a("--resume", default=None, help="continue the run in this folder from its last finished "
      "epoch; only " + ", ".join("--" + k.replace("_", "-") for k in STEERING) + " may be given "
      "with it (the batch's two keep the global batch), and any other flag only with the run's "
      "own value")
    a("--force", action="store_true", help="replace an existing run folder (only a run folder) "
      "with the new run, whole, once the new run has finished")
    a("--no-cache", action="store_true", help="keep nothing in $BRAINTUNE_CACHE (default .cache): "
      "responses, audio, features and stage-1 fits are made again and deleted at exit")


def given_flags(p, argv):
    """{flag's dest: value} of the flags on the command line alone (the defaults left out)."""
    quiet = guard.Parser(add_help=False)
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
    first, given = p.parse_args(argv), given_flags(p, argv)
    if first.resume:
        return resumed(p, first.resume, given)
    if "control_block" in given and first.control == "none":
        raise ValueError("--control-block: a setting of --control permuted, which is not given; "
                         "give --control permuted too, or leave --control-block out")
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
    listed in args.steered. Any other flag is accepted with the run's own value and refused with
    another (it would change what was done); --epochs never below the epochs the run finished."""
    if given.get("force"):
        raise ValueError("--force replaces a run folder and --resume continues one; give one")
    saved = runfolder.read_config(run, "--resume")["args"]
    unchanged(p, run, saved, given)
    args = saved_flags(p, saved)
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
    done = runfolder.epochs_done(run)
    if args.epochs < done:
        raise ValueError(f"--epochs {args.epochs}: the run in {run} has finished {done} epochs; "
                         f"--resume extends a run (--epochs {done} or more), never shortens it")
    args.resume, args.force, args.steered = run, False, steered
    return resolve(args)


def saved_flags(p, saved):
    """A run's recorded flags (config.json's args) as parse_args would give them, unresolved."""
    args = argparse.Namespace(**dict(vars(p.parse_args([])), **saved))
    if args.weights and os.path.basename(args.weights) == "tiny_pretrained.pt":
        args.weights = None  # tiny's pretrained weights travel with the run folder
    return args


def unchanged(p, run, saved, given):
    """Refuses a flag given with --resume that would change the run: each flag not in STEERING
    must resolve to the run's own value (`--roi all` beside --resume of a run of --roi all is the
    user's command repeated, and changes nothing)."""
    fixed = sorted(k for k in given if k not in STEERING + ("resume",))
    if not fixed:
        return
    mine = dict(given, data=os.path.abspath(given.get("data") or saved["data"]))
    theirs = flags_record(resolve(saved_flags(p, dict(saved, **{k: given[k] for k in given
                                                                if k in STEERING}))))
    mine = flags_record(resolve(saved_flags(p, dict(saved, **mine))))
    for k in fixed:
        if mine[k] != theirs[k]:
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{flag} {shown(given[k])}: the run in {run} has {flag} "
                             f"{shown(theirs[k])}; with --resume a flag may repeat the run's own "
                             "value, not change it (start a new run; only " +
                             ", ".join("--" + s.replace("_", "-") for s in STEERING) +
                             " steer it)")


def shown(value):
    """A flag's value as a command line gives it."""
    if isinstance(value, bool):
        return "(given)" if value else "(not given)"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return f"{value[0]:g},{value[-1]:g},{len(value)}"  # --alphas, as given
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def resolve(args):
    """The flags' values, from the command line or a run's config.json, resolved in place once:
    the story lists, --roi as voxels.Voxels, --protocol and its settings as one
    features.Protocol; each checked alone and against the others."""
    for k in ("test_stories", "val_stories"):
        if isinstance(getattr(args, k), str):
            setattr(args, k, getattr(args, k).split(","))
    if isinstance(args.train_stories, str):
        args.train_stories = story_list(args.train_stories)
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
    """--alphas first,last,count: the ridge's lambdas, log-spaced (an argparse type)."""
    kinds = (RATE, RATE, number(int, low=1, high=MAX_LAMBDAS))
    parts = text.split(",")
    values = [k.parse(x) for k, x in zip(kinds, parts)]
    ok = len(parts) == 3 and all(v is not None and k.holds(v) for k, v in zip(kinds, values))
    if not ok or values[0] > values[1]:
        raise ValueError(f"expected first,last,count: lambdas {RATE}, first <= last, and a count "
                         f"{kinds[2]}, e.g. 1e-1,1e8,19 (got {text!r})")
    return np.logspace(np.log10(values[0]), np.log10(values[1]), values[2]).tolist()


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
    """What a number's own range (its parser type, guard.number) cannot say: the ranges that
    depend on the model or the processes; --weights there, --device on this machine."""
    if args.weights and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights}: no such file")
    width = architecture(args.model)["encoder_embed_dim"]
    if args.lora_rank > width:
        raise ValueError(f"--lora-rank {args.lora_rank}: must be at most the layer's width, "
                         f"{width} ({args.model})")
    if not args.lora_targets or not set(args.lora_targets) <= set("qkvo"):
        raise ValueError(f"--lora-targets {args.lora_targets}: must be letters of qkvo")
    if args.batch_size < dist.WORLD:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least the number of "
                         f"processes, {dist.WORLD}")
    if args.device:
        check_device(args.device)


def check_device(name):
    """--device names a device this machine has, of a kind braintune runs on (cpu, cuda)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; try cpu, cuda or cuda:1") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: braintune runs on cpu or cuda, not {dev.type}")
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
    """The run's fMRI timing (--tr, --trim-start, --sound-start), as data's functions take it."""
    return dict(tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start)


def load_subjects(args, names):
    """data.prepare under the run's flags: each subject's data (data.Subject), held out on the
    run's test, validation and training stories, and the windows they share."""
    return data.prepare(args.data, names, args.test_stories, args.val_stories,
                        args.train_stories, drop_nonfinite=args.drop_nonfinite_voxels,
                        history=args.history, **timing(args))


def ridge_settings(args, listings):
    """How the run fits every ridge (ridge.Settings); the folds default to 5, or one per training
    story where there are fewer."""
    n_train = min(len(d.stories["train"]) for d in listings)
    folds = args.cv_folds or min(5, n_train)
    if folds < 2:
        raise ValueError(f"{args.data}: ridge's cross-validation needs two training stories or "
                         "more; there is one")
    return ridge.Settings(args.alphas, folds, args.block, args.protocol.test_skip)
