"""
A run's flags (flags.py) read once: the recipe's defaults set, each flag checked alone and against
the others before anything is read, and resolved (--roi as one named value, voxels.Voxels;
--protocol and its settings as another, features.Protocol); nothing writes to them after it.
--resume reads a run's own flags back and lets only the steering ones change. What the dataset's
listings add, and whether the largest allocations fit in memory, preflight.py checks.

    args = parse(["--subject", "S01", "--roi", "all"])    # checked alone and against each other
    args = parse(["--resume", "runs/RUN", "--epochs", "30"])  # a run's flags, steered
"""
import argparse
import os

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
from flags import RECIPES, STEERING, parser
from model import BUNDLES, TINY, Augment, window_frames

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
    if args.epochs and (scored_epochs(args) or [0])[-1] > args.epochs:
        raise ValueError(f"--select {args.select}: must be epochs up to --epochs {args.epochs}")
    frames = window_frames(architecture(args.model), round(args.history * args.tr * data.SR))
    if args.mask_time_prob and args.mask_time_length > frames:
        raise ValueError(f"--mask-time-length {args.mask_time_length}: must be at most a "
                         f"window's {frames} frames (--history {args.history})")
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
    """The run's fMRI timing (--tr, --trim-start, --sound-start) and the training windows' --lag,
    as data's functions take them."""
    return dict(tr=args.tr, trim_start=args.trim_start, sound_start=args.sound_start, lag=args.lag)


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
