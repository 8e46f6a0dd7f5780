"""
The run folder and every file in it, each written atomically by its one owner here and read back
by train.py (--resume) and eval.py alike:

    config.json      the flags as given and resolved, the stories, the versions
    tiny_pretrained.pt   tiny's phone-pretrained weights (a run with tiny)
    stage1.pt        each subject's stage-1 ridge fits (ridge.fit_state)
    checkpoint.pt    stage 2 as the last finished epoch left it: what --resume continues
    adapter.pt       the trainable parameters of the epoch kept
    epoch_N.pt       those after epoch N, for each other epoch --select lists (6,11,21)
    metrics.jsonl    one line per epoch
    results.json, voxel_r.npz, blocks.pt   the results, each voxel's r, the test story's block sums

Every .pt file is a dict with named keys and "format": FORMAT; a folder of another format is
refused in one sentence. Tensors are saved on the CPU, so that a run trained on a GPU is read
anywhere. One process writes a run folder (guard.RunLock, held by the first process for the whole
run); --force replaces only a run folder, and whole: the new run is made beside it, in
NAME.new-<pid>, and swapped in when it has finished (finish).
"""
import contextlib
import json
import os
import shutil
import time

import torch

import dist
import guard
import ridge
from cache import read_json, save_atomic
from model import load_checkpoint

FORMAT = 3  # of config.json and the .pt files: dicts with named keys
_RUN = {}  # this process's run: its name, the folder it writes in, what it keeps, its locks


def choose(args):
    """The run folder: --resume's, --out, or runs/<subjects>_<roi>_<model>_<time>, checked before
    any work: a folder this process can write in (or make), an existing one refused without
    --resume or --force, and with --force only a run folder of this format. The first process
    decides and tells the others (a new name holds the time), and holds an existing folder from
    here on. Returns the folder the run writes in: --force's is made beside the old one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    default = f"{args.subject.replace(',', '+')}_{args.roi.text}_{args.model}_{stamp}"
    name = args.resume or args.out or os.path.join("runs", default)
    name, beside = dist.first_process_value((name, f"{name.rstrip('/')}.new-{os.getpid()}"))
    guard.writable_folder(name, "--resume" if args.resume else "--out")
    taken = os.path.isdir(name) and os.listdir(name)
    if not args.resume and taken and not args.force:
        raise ValueError(f"{name} already exists; use --resume {name} to continue it or "
                         "--force to replace it")
    if not args.resume and taken:
        try:
            read_config(name, "--force")
        except ValueError:
            raise ValueError(f"--force {name}: not a braintune run folder (no config.json of "
                             f"format {FORMAT}); --force replaces only a run folder (nothing was "
                             "written)") from None
        guard.writable_folder(os.path.dirname(os.path.abspath(name)), "--force")
    folder = beside if taken and not args.resume else name
    _RUN.update(name=name, folder=folder, kept=resumed_kept(name) if args.resume else None,
                locks=_RUN.get("locks", []))
    if dist.RANK == 0 and taken:  # --resume's, or --force's old run: no one else writes it now
        _RUN["locks"].append(guard.RunLock(name).acquire())
    return folder


def make(run):
    """The run folder, made at the run's first write (first process) and held by this process
    until the run ends (held): a new folder must still be empty when it is locked."""
    os.makedirs(run, exist_ok=True)
    if any(lock.folder == run for lock in _RUN["locks"]):
        return
    _RUN["locks"].append(guard.RunLock(run).acquire())
    if set(os.listdir(run)) - {guard.RunLock.NAME}:
        raise ValueError(f"{run}: another run began writing in it; choose another --out")


def finish(run):
    """The run's end (first process): --force's new run swapped in for the old, which is then
    removed whole. A kill between the two renames leaves NAME.old-<pid> (the old run) and
    NAME.new-<pid> (the new one, finished) and no NAME. Returns the run folder's name."""
    name = _RUN["name"]
    if run != name:
        old, new = (next(lock for lock in _RUN["locks"] if lock.folder == f) for f in (name, run))
        aside = f"{name.rstrip('/')}.old-{os.getpid()}"
        old.rename(aside)
        new.rename(name)
        _RUN["locks"].remove(old)
        old.release()
        shutil.rmtree(aside)
    _RUN.update(folder=name, kept="the results")
    return name


@contextlib.contextmanager
def held():
    """`with held():` a run; the run folder's locks are released when it ends, however it ends."""
    _RUN.clear()
    _RUN["locks"] = []
    try:
        yield
    finally:
        for lock in _RUN.pop("locks"):
            lock.release()


def kept(resume=True):
    """What the run folder keeps now (and, with resume, how to go on), for the one line that an
    interruption or a stop prints."""
    run, what, name = _RUN.get("folder"), _RUN.get("kept"), _RUN.get("name")
    if not what:
        return "nothing was written to a run folder"
    if what == "the results":
        return f"the run finished in {run}"
    old = f" ({name} still holds the run that --force would replace)" if run != name else ""
    how = f"; resume with: python train.py --resume {run}" if resume else ""
    return f"{run} keeps {what}{old}{how}"


def resumed_kept(run):
    """What a run folder given to --resume keeps already."""
    done = epochs_done(run)
    if done:
        return f"epoch {done}"
    return "stage 1" if os.path.isfile(os.path.join(run, "stage1.pt")) else "its config"


def epochs_done(run):
    """The epochs a run folder's record holds (metrics.jsonl's lines)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def cpu(x):
    """x with every tensor in it (nested dicts and lists) on the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(cpu(v) for v in x)
    return x


def read(path, what):
    """A .pt file of this format, as a dict; another format is refused in one sentence."""
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path}: written by another version of braintune (format "
                         f"{saved.get('format') if isinstance(saved, dict) else '?'}, not "
                         f"{FORMAT}); {what}")
    return saved


# -----------------------------------------------------------------------------
# config.json

def write_config(run, flags, stories, extra):
    """config.json: the flags (config.flags_record), each subject's stories, and `extra` (the
    versions, ran_on: the device and precision the features were computed in)."""
    cfg = dict(format=FORMAT, args=flags, stories=stories, **extra)
    save_atomic(json.dumps(cfg, indent=1), os.path.join(run, "config.json"))
    _RUN["kept"] = "its config (stage 1 not finished)"


def update_config(run, **values):
    """config.json with its top-level `values` replaced (a resumed run's ran_on)."""
    path = os.path.join(run, "config.json")
    save_atomic(json.dumps(dict(read_json(path), **values), indent=1), path)


def read_config(run, flag):
    """A run folder's config.json, refused in one sentence naming `flag` if it is not one of this
    format's."""
    path = os.path.join(run, "config.json")
    try:
        cfg = read_json(path)
        saved = cfg["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{flag} {run}: {path} is not the config of a run "
                         f"({type(e).__name__}); {flag} takes the folder of an earlier run") \
            from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{flag} {run}: written by another version of braintune (format "
                         f"{cfg.get('format', 'none')}, not {FORMAT}); run it again in a new "
                         "folder")
    if not {"data", "subject", "model", "roi"} <= set(saved):
        raise ValueError(f"{flag} {run}: {path} lacks the run's data, subject, model or roi")
    return cfg


def steer_config(run, steered, epoch):
    """config.json with the steering flags given to --resume in force and recorded, with the
    epoch they take effect at."""
    path = os.path.join(run, "config.json")
    cfg = read_json(path)
    cfg["args"].update(steered)
    cfg.setdefault("resumed", []).append(dict(epoch=epoch, flags=steered))
    save_atomic(json.dumps(cfg, indent=1), path)


# -----------------------------------------------------------------------------
# stage1.pt

def save_stage1(run, fits):
    """stage1.pt: each subject's ridge.Stage1, the baseline None where it is the init itself."""
    subjects = [dict(init=ridge.fit_state(f.init),
                     baseline=None if f.baseline is f.init else ridge.fit_state(f.baseline))
                for f in fits]
    save_atomic(dict(format=FORMAT, subjects=cpu(subjects)), os.path.join(run, "stage1.pt"))
    _RUN["kept"] = "stage 1"


def read_stage1(run):
    """stage1.pt back as [ridge.Stage1]."""
    saved = read(os.path.join(run, "stage1.pt"), "run stage 1 again in a new run folder")
    fits = []
    for s in saved["subjects"]:
        init = ridge.fit_from_state(s["init"])
        base = init if s["baseline"] is None else ridge.fit_from_state(s["baseline"])
        fits.append(ridge.Stage1(init, base))
    return fits


# -----------------------------------------------------------------------------
# checkpoint.pt, metrics.jsonl, adapter.pt

def save_checkpoint(run, state, opt, sched, trainable, *, scored=False):
    """checkpoint.pt (what a resumed run continues from: the optimiser, the schedule, every
    random generator's state, stage 2's state (a dict) and the trainable parameters), and
    metrics.jsonl, each atomically; with scored, epoch_N.pt first (save_epoch)."""
    if scored:  # first: a run resumed from the checkpoint finds it
        save_epoch(run, trainable, state["epoch"])
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    ckpt = dict(format=FORMAT, opt=opt.state_dict(), sched=sched.state_dict(),
                rng=torch.get_rng_state(), cuda_rng=cuda, state=state, trainable=trainable)
    save_atomic(cpu(ckpt), os.path.join(run, "checkpoint.pt"))
    lines = "".join(json.dumps(m) + "\n" for m in state["metrics"])
    save_atomic(lines, os.path.join(run, "metrics.jsonl"))
    _RUN["kept"] = f"epoch {state['epoch']}"


def read_checkpoint(run):
    """checkpoint.pt as saved, its random generators' states restored; None if there is none."""
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    ckpt = read(path, "start a new run")
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"][:torch.cuda.device_count()])
    return ckpt


def save_adapter(run, trainable, epoch, flags):
    """adapter.pt: the trainable parameters of the epoch kept (0: the initial state)."""
    save_atomic(cpu(dict(format=FORMAT, trainable=trainable, epoch=epoch, args=flags)),
                os.path.join(run, "adapter.pt"))


def save_epoch(run, trainable, epoch):
    """epoch_N.pt: the trainable parameters after epoch N, an epoch --select lists but does not
    keep, scored on the test story after training. For full tuning they are the transformer
    (about 340 MB for a base model), so they wait on disk, not in memory."""
    save_atomic(cpu(dict(format=FORMAT, trainable=trainable, epoch=epoch)),
                os.path.join(run, f"epoch_{epoch}.pt"))


def read_epoch(run, epoch):
    """epoch_N.pt's trainable parameters (save_epoch)."""
    path = os.path.join(run, f"epoch_{epoch}.pt")
    return read(path, "tune again in a new run folder")["trainable"]


SHAPING = ("model", "layer", "lora_rank", "lora_targets", "bottleneck", "history", "pool",
           "subject", "roi")  # the flags that shape adapter.pt's tensors


def read_adapter(run):
    """adapter.pt's trainable parameters, or None for a run that stopped after stage 1; one made
    under other flags than config.json's (SHAPING) is refused in one sentence."""
    path = os.path.join(run, "adapter.pt")
    if not os.path.isfile(path):
        return None
    saved, flags = read(path, "tune again in a new run folder"), read_config(run, "")["args"]
    made = saved.get("args") or {}
    for k in (k for k in SHAPING if k in made and k in flags and made[k] != flags[k]):
        raise ValueError(f"{path}: made under --{k.replace('_', '-')} {made[k]}, but config.json "
                         f"says {flags[k]}; it is not this run's (tune again in a new run folder)")
    return saved["trainable"]


# -----------------------------------------------------------------------------
# the results

def save_results(run, results, arrays, blocks):
    """results.json, voxel_r.npz ({name: (voxels,)}) and blocks.pt ({subject: {"baseline",
    "refit"}: each a ridge.BlockSums as a dict, or None}), each atomically."""
    save_atomic(json.dumps(results, indent=1), os.path.join(run, "results.json"))
    save_atomic(arrays, os.path.join(run, "voxel_r.npz"))
    sums = {s: {k: None if b is None else dict(sums=b.sums, rows=b.rows) for k, b in m.items()}
            for s, m in blocks.items()}
    save_atomic(dict(format=FORMAT, subjects=cpu(sums)), os.path.join(run, "blocks.pt"))


def read_blocks(run):
    """blocks.pt as {subject: {"baseline", "refit"}: ridge.BlockSums or None}."""
    saved = read(os.path.join(run, "blocks.pt"), "run it again in a new run folder")
    return {s: {k: None if b is None else ridge.BlockSums(b["sums"], b["rows"])
                for k, b in m.items()} for s, m in saved["subjects"].items()}
