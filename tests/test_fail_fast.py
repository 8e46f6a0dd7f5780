"""Every mistake a user can make on the command line is refused in one clear line, before any costly
work: non-zero exit, no traceback, the flag or file named, nothing written. One table of mistakes
across the six commands (train, eval, synthetic, tasks, bench, fetch), each row checked the same
way; then the checks a row cannot make: a process of its own, Ctrl-C, a second writer, torchrun."""
import contextlib
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import h5py
import numpy as np
import pytest
import torch
from scipy.io import wavfile

import config
import guard
import preflight
import runfolder
import synthetic
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_all(cmds, env, cwd=ROOT):
    """Each command's (exit status, stdout, stderr): a command [python, SCRIPT, ARGS...] runs as
    `python SCRIPT ARGS` would, but in this process (its file executed as __main__ under env and
    cwd), as a refusal needs no process of its own and torch's import costs seconds each; an
    exception other than SystemExit escaping it counts as a traceback (one refusal of each script
    is also checked in a process of its own, run_processes)."""
    return [run_here(c[1:], env, cwd) for c in cmds]


def run_here(argv, env, cwd):
    """(exit status, stdout, stderr) of `python *argv` run in this process: argv[0] executed as
    __main__ with sys.argv, the folder and the environment set for it and restored after; Python
    warnings are printed to its stderr as a process would print them."""
    old_argv, old_cwd, old_env = sys.argv, os.getcwd(), dict(os.environ)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        sys.argv = list(argv)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            warnings.resetwarnings()  # Python's own default filters, not pytest's capture
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                          ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # sys.exit("error: ...") prints its message and exits with 1
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        err.write("" if e.code is None or isinstance(e.code, int) else f"{e.code}\n")
    except Exception:  # noqa: BLE001 - what a process would print as a traceback
        code = 1
        err.write(traceback.format_exc())
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return code, out.getvalue(), err.getvalue()


def run_processes(cmds, env, cwd=ROOT):
    """Each command's (exit status, stdout, stderr), each in a process of its own."""
    done = [subprocess.run(c, cwd=cwd, env=env, capture_output=True, text=True) for c in cmds]
    return [(d.returncode, d.stdout, d.stderr) for d in done]


def one_line(result, says):
    """The refusal of a command's result: non-zero, no traceback, one line on stderr saying it."""
    code, _, stderr = result
    lines = stderr.strip().splitlines()
    assert code != 0 and "Traceback" not in stderr, stderr[-1500:]
    assert len(lines) == 1 and says in lines[0], (says, stderr)


# -----------------------------------------------------------------------------
# the places a mistake is made with: datasets broken the ways a user's can be, runs, read-only

def linked_copy(demo, out):
    """A copy of the demo dataset made of links to its files: a file broken in it is written in
    place of its link (remove it first: writing through it would change the demo)."""
    shutil.copytree(demo, out, copy_function=os.symlink)
    return out


def unlinked(path):
    os.remove(path)
    return path


def write_hf5(path, **arrays):
    with h5py.File(unlinked(path), "w") as f:
        for k, v in arrays.items():
            f[k] = v


@pytest.fixture(scope="module")
def ds(demo, tmp_path_factory):
    """The demo dataset, and copies of it broken the ways a user's can be, each in one file."""
    base = tmp_path_factory.mktemp("broken")
    nogrids = shutil.copytree(demo, base / "nogrids")
    shutil.rmtree(nogrids / "derivative" / "TextGrids")
    unfetched = shutil.copytree(demo, base / "unfetched")
    hf5 = unfetched / "derivative" / "preprocessed_data" / "UTS01" / "souls.hf5"
    os.remove(hf5)
    # datalad, not got
    os.symlink("../../../.git/annex/objects/Xx/Yy/SHA256E-s1--0.hf5/SHA256E-s1--0.hf5", hf5)
    pointer = shutil.copytree(demo, base / "pointer")
    (pointer / "stimuli" / "avatar.wav").write_text("/annex/objects/SHA256E-s123--abc.wav\n")
    out = {"demo": demo, "nogrids": str(nogrids), "unfetched": str(unfetched),
           "pointer": str(pointer)}
    resp = os.path.join("derivative", "preprocessed_data", "UTS01")
    first = os.path.join(resp, "alternateithicatom.hf5")  # the first story read
    with h5py.File(os.path.join(demo, first)) as f:
        x = f["data"][:]
    with h5py.File(os.path.join(demo, resp, "wheretheressmoke.hf5")) as f:
        test, reps = f["data"][:], f["individual_repeats"][:]
    for name in ("nanrow", "nanwav", "zerohz", "empty", "repeats", "badgrid", "badroi"):
        out[name] = str(linked_copy(demo, base / name))
    nan = x.copy()
    nan[3] = np.nan  # a NaN row: once, every voxel silently dropped
    write_hf5(os.path.join(out["nanrow"], first), data=nan)
    wav = os.path.join("stimuli", "alternateithicatom.wav")
    sr, wave = wavfile.read(os.path.join(demo, wav))
    wave = wave.astype(np.float32) / 2 ** 15
    wave[sr] = np.nan  # at 1 s
    wavfile.write(unlinked(os.path.join(out["nanwav"], wav)), sr, wave)
    header = bytearray(open(os.path.join(demo, "stimuli", "avatar.wav"), "rb").read())
    header[24:32] = bytes(8)  # a sample rate of 0 (and bytes per second, which follow from it)
    open(unlinked(os.path.join(out["zerohz"], "stimuli", "avatar.wav")), "wb").write(header)
    write_hf5(os.path.join(out["empty"], resp, "avatar.hf5"), data=np.zeros((0, 90)))
    write_hf5(os.path.join(out["repeats"], resp, "wheretheressmoke.hf5"), data=test,
              individual_repeats=reps[:, :, :89])
    grid = os.path.join("derivative", "TextGrids", "alternateithicatom.TextGrid")
    text = open(os.path.join(demo, grid)).read().replace("xmax = 0.06", "xmax = -1", 1)
    open(unlinked(os.path.join(out["badgrid"], grid)), "w").write(text)
    rois = os.path.join("derivative", "rois", "UTS01.npz")
    np.savez(unlinked(os.path.join(out["badroi"], rois)), AC=np.ones(89, bool))
    np.save(base / "mask89.npy", np.ones(89, np.int64))  # 0s and 1s, one short of the voxels
    (base / "emb.txt").write_text("foo 1 2 3\nbar 1 x 3\n")
    out.update(mask89=str(base / "mask89.npy"), emb=str(base / "emb.txt"))
    return out


def cannot_write(folder):
    """Whether this process is refused a new file in `folder`."""
    try:
        guard.writable_folder(str(folder), "")
        return False
    except ValueError:
        return True


@pytest.fixture(scope="module")
def runs(run, tmp_path_factory):
    """Run folders: the finished two-epoch run (conftest), a stage-1 run, a copy of the first
    that this process cannot write in (None where nothing stops it: chmod, then chattr +i, which
    stops root too), and a copy whose adapter.pt is of another --lora-rank than its config."""
    base = tmp_path_factory.mktemp("runs-broken")
    stage1 = train.main(["--model", "tiny", "--tiny-pretrain", "0", "--epochs", "0", "--data",
                         json.load(open(os.path.join(run, "config.json")))["args"]["data"],
                         "--out", str(base / "stage1")])
    ro = shutil.copytree(run, base / "ro")
    ro.chmod(0o555)
    if not cannot_write(ro):
        subprocess.run(["chattr", "+i", str(ro)], capture_output=True)
    other = shutil.copytree(run, base / "other")
    cfg = json.load(open(other / "config.json"))
    cfg["args"]["lora_rank"] = 4  # the run's adapters have rank 64
    (other / "config.json").write_text(json.dumps(cfg))
    yield {"run": run, "stage1": stage1, "rorun": str(ro) if cannot_write(ro) else None,
           "other": str(other)}
    subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
    ro.chmod(0o755)


# -----------------------------------------------------------------------------
# one table: each row a command run with a mistake

@dataclass
class Mistake:
    """A command run with a mistake. Its texts are filled in from the case's places: {tmp} a folder
    of its own (the working folder, $BRAINTUNE_CACHE inside), {notes} a user's file, {mine} a
    user's folder holding notes.txt, {ro} a folder this process cannot write in, {cache} a cache
    shared by the rows that are refused while the data is read (the files read before are cached,
    as they should be), the datasets of the ds fixture ({demo}, {nogrids}, {nanrow} ...) and the
    runs of the runs fixture ({run}, {stage1}, {rorun}, {other})."""
    script: str  # train.py, eval.py, synthetic.py, tasks.py, bench.py, fetch.py
    argv: list  # its arguments
    says: str | tuple  # what the one line on stderr holds (each of them)
    absent: tuple = ()  # paths that must not exist afterwards
    kept: tuple = ("{notes}", "{mine}/notes.txt")  # the user's files, unchanged
    env: dict = field(default_factory=dict)  # environment variables set for it (None: unset)
    cwd: str = "{tmp}"  # the working folder


def train_mistake(argv, says, **kw):
    """train.py with the demo dataset, tiny, stage 1 only and a new run folder, and argv."""
    base = ["--data", "{demo}", "--model", "tiny", "--tiny-pretrain", "0", "--epochs", "0",
            "--out", "{tmp}/run"]
    return Mistake("train.py", base + argv, says, kw.pop("absent", ("{tmp}/run",)), **kw)


def eval_mistake(argv, says, **kw):
    return Mistake("eval.py", argv, says, **kw)


def synthetic_mistake(argv, says, absent=("{tmp}/d",)):
    return Mistake("synthetic.py", argv, says, absent)


def words_mistake(argv, says, absent=("{tmp}/w",)):
    return Mistake("tasks.py", ["words", *argv], says, absent)


def fetch_mistake(argv, says, env=None):
    return Mistake("fetch.py", ["ds003020", *argv], says, ("{tmp}/ds", "{tmp}/ds003020"),
                   env=env or {})


def arg(flag, kind):
    """argparse's line for a number flag out of its range."""
    return f"argument {flag}: must be {kind}"


D = ["{tmp}/d"]
W = ["{demo}", "{tmp}/w"]
URL = "expected an http:// or https:// address such as https://s3.amazonaws.com"
MEMORY = "the synthetic dataset needs about"
CACHE = "$BRAINTUNE_CACHE (default .cache)"
POSITIVE, NATURAL = "a finite number > 0", "an integer >= 0"
LOADING = {"BRAINTUNE_CACHE": "{cache}"}

TRAIN = [
    # numbers: each flag's own range, refused by argparse
    train_mistake(["--tr", "inf"], arg("--tr", f"{POSITIVE} (got 'inf')")),  # once: "memory"
    train_mistake(["--tr", "nan"], arg("--tr", POSITIVE)),
    train_mistake(["--tr", "0"], arg("--tr", POSITIVE)),
    train_mistake(["--warmup", "inf"], arg("--warmup", "a finite number >= 0")),
    train_mistake(["--lr", "inf"], arg("--lr", POSITIVE)),  # once: nan after stage 1
    train_mistake(["--lr", "-1"], arg("--lr", f"{POSITIVE} (got '-1')")),
    train_mistake(["--sound-start", "nan"], arg("--sound-start", "a finite number (got 'nan')")),
    train_mistake(["--epochs", "-1"], arg("--epochs", NATURAL)),
    train_mistake(["--epochs", "1.5"], arg("--epochs", f"{NATURAL} (got '1.5')")),
    train_mistake(["--history", "0"], arg("--history", "an integer >= 1")),
    train_mistake(["--batch-size", "0"], arg("--batch-size", "an integer >= 1")),
    train_mistake(["--lora-dropout", "1.5"], arg("--lora-dropout", "a finite number in [0, 1)")),
    train_mistake(["--bottleneck", "-5"], arg("--bottleneck", NATURAL)),
    train_mistake(["--control-block", "0"], arg("--control-block", "an integer >= 1")),
    train_mistake(["--seed", "-1"], arg("--seed", "an integer in [0, 4294967295]")),
    train_mistake(["--protocol", "moussa2025", "--stride", "0"], arg("--stride", POSITIVE)),
    train_mistake(["--alphas", "1,2"], "argument --alphas: expected first,last,count"),
    train_mistake(["--alphas", "1e-1,inf,19"], ("argument --alphas", "(got '1e-1,inf,19')")),
    train_mistake(["--alphas", "1e-1,1e8,1e9"], ("argument --alphas", "[1, 1000000]")),
    train_mistake(["--nosuch"], "unrecognized arguments: --nosuch"),
    # ranges that depend on each other, the model or the data (the pre-flight)
    train_mistake(["--block", "1000"], "--block 1000: the test rows of UTS01 (24 scored) make 1 "
                                       "block(s); the bootstrap needs two or more (choose --block "
                                       "23 or less)"),
    train_mistake(["--test-skip", "23"], "--test-skip 23: the test story 'wheretheressmoke' of "
                                         "UTS01 has 24 rows, leaving 1 to score"),
    train_mistake(["--protocol", "moussa2025"],
                  "--test-skip 40: the test story 'wheretheressmoke' of UTS01 has 24 rows"),
    train_mistake(["--control", "permuted", "--control-block", "1000"],
                  "--control-block 1000: no training or validation story has two blocks of it"),
    train_mistake(["--control-block", "5"], "--control-block: a setting of --control permuted"),
    train_mistake(["--context", "3"],
                  "--context: a setting of moussa2025 or brainwavlm, not of --protocol windows"),
    train_mistake(["--protocol", "brainwavlm", "--delays", "a,b"],
                  "--delays a,b: expected TR delays"),
    train_mistake(["--history", "1000"],
                  "--history 1000: longer than the shortest training story (24 TRs)"),
    train_mistake(["--bottleneck", "100000"],
                  "--bottleneck 100000: larger than the features (256) or the voxels (90)"),
    train_mistake(["--lora-rank", "65"],
                  "--lora-rank 65: must be at most the layer's width, 64 (tiny)"),
    train_mistake(["--lora-targets", "qxz"], "--lora-targets qxz: must be letters of qkvo"),
    train_mistake(["--protocol", "brainwavlm", "--test-skip", "0", "--context", "100000"],
                  "--infer-batch or --context: stage 1 would need about"),
    train_mistake(["--model", "wavlm_base_plus", "--epochs", "1", "--history", "12",
                   "--batch-size", "96"], ("--batch-size: stage 2 would need about",
                                           "(--batch-size B/N --accum N keeps the global batch "
                                           "of B)")),
    train_mistake(["--sound-start", "-100"], "audio is 60.0 s long but its last fMRI frame needs"),
    train_mistake(["--sound-start", "1e9"],
                  "before the audio starts (see --sound-start, --trim-start, --tr)"),
    train_mistake(["--cv-folds", "12"], "--cv-folds 12: UTS01 has 4 training stories"),
    train_mistake(["--roi", "V7"], "unknown ROI 'V7' for UTS01"),
    train_mistake(["--roi", "top0"], "--roi top0: expected topN"),
    train_mistake(["--roi", "top100000"], "--roi top100000: UTS01 has 90 voxels"),
    train_mistake(["--roi", "{tmp}/nope.npy"], "{tmp}/nope.npy: no such ROI file"),
    train_mistake(["--roi", "{mask89}"], "--roi {mask89}: holds 89 0s and 1s, a mask of the "
                                         "wrong length (the responses have 90 voxels)"),
    train_mistake(["--subject", "S01,S02", "--roi", "mine.npy"],
                  "a .npy file holds one subject's voxel indices"),
    train_mistake(["--subject", "S07"], "unknown subject 'S07'"),
    train_mistake(["--model", "nosuch"], "--model nosuch: unknown"),
    train_mistake(["--layer", "9"], "--layer 9: tiny has layers 1..4"),
    train_mistake(["--device", "mps"], "--device mps: braintune runs on cpu or cuda, not mps"),
    train_mistake(["--device", "meta"], "--device meta: braintune runs on cpu or cuda, not meta"),
    train_mistake(["--device", "cuda:99"], "CUDA device(s); use --device cpu"),
    train_mistake(["--val-stories", "wheretheressmoke"],
                  "--val-stories wheretheressmoke and --test-stories wheretheressmoke"),
    train_mistake(["--val-stories", "nosuchstory"],
                  "story 'nosuchstory' has no responses for UTS01"),
    train_mistake(["--weights", "{tmp}/nope.pt"], "{tmp}/nope.pt: no such file"),
    # the places written: the run folder, the cache
    train_mistake(["--out", "{mine}"], "{mine} already exists; use --resume {mine} to continue it "
                                       "or --force to replace it", absent=()),
    train_mistake(["--out", "{mine}", "--force"],
                  "--force {mine}: not a braintune run folder (no config.json of format 3)",
                  absent=()),
    train_mistake(["--out", "{notes}"], "--out {notes}: {notes} is a file, where a folder must be",
                  absent=()),
    train_mistake(["--out", "{notes}/run"], "--out {notes}/run: {notes} is a file"),
    train_mistake(["--out", "{ro}/run"], "--out {ro}/run: cannot write in {ro} (",
                  absent=("{ro}/run",)),
    train_mistake([], f"{CACHE} {{notes}}: {{notes}} is a file, where a folder must be",
                  env={"BRAINTUNE_CACHE": "{notes}"}),
    train_mistake([], f"{CACHE} {{ro}}/cache: cannot write in {{ro}} (",
                  env={"BRAINTUNE_CACHE": "{ro}/cache"}),
    train_mistake([], f"{CACHE} {{ro}}/.cache: cannot write in {{ro}} (",
                  env={"BRAINTUNE_CACHE": None}, cwd="{ro}"),  # the default, where it cannot be
    # the data, each file named: its listings and headers (the pre-flight), then as it is read
    train_mistake(["--data", "{tmp}/nodata"], "preprocessed_data: no such folder"),
    train_mistake(["--data", "{unfetched}"],
                  "souls.hf5: not fetched yet (a datalad placeholder); run `datalad get"),
    train_mistake(["--data", "{pointer}"], "avatar.wav: not fetched yet"),
    train_mistake(["--data", "{nogrids}", "--tiny-pretrain", "4"],
                  "alternateithicatom.TextGrid: no such file; tiny's phone pretraining"),
    train_mistake(["--data", "{badgrid}", "--tiny-pretrain", "4"],
                  "alternateithicatom.TextGrid: tier 'phone', interval 1 ends at -1 s, before it "
                  "starts (0 s)"),
    train_mistake(["--data", "{zerohz}"], "{zerohz}/stimuli/avatar.wav: its header says 0 Hz"),
    train_mistake(["--data", "{empty}"], "UTS01/avatar.hf5: 'data' has shape (0, 90); expected "
                                         "(TRs, voxels), neither 0"),
    train_mistake(["--data", "{repeats}"], "wheretheressmoke.hf5: 'individual_repeats' has shape "
                                           "(10, 24, 89)"),
    train_mistake(["--data", "{badroi}", "--roi", "AC"],
                  "UTS01.npz[AC]: mask has shape (89,), the responses have 90 voxels"),
    train_mistake(["--data", "{nanrow}"], "alternateithicatom.hf5: NaN or inf in 1 of its 24 rows "
                                          "(row 3); --drop-nonfinite-voxels leaves out"),
    train_mistake(["--data", "{nanwav}"], "alternateithicatom.wav: 1 samples are NaN or infinite, "
                                          "the first at 1.00 s", env=LOADING),
    # --resume: the run's own flags only, never shortened
    Mistake("train.py", ["--resume", "{run}", "--roi", "AC"],
            "--roi AC: the run in {run} has --roi all; with --resume a flag may repeat the run's "
            "own value, not change it"),
    Mistake("train.py", ["--resume", "{run}", "--lr", "1"], "--lr 1.0: the run in {run} has --lr "
                                                            "0.003"),
    Mistake("train.py", ["--resume", "{run}", "--epochs", "1"],
            "--epochs 1: the run in {run} has finished 2 epochs; --resume extends a run "
            "(--epochs 2 or more), never shortens it"),
    Mistake("train.py", ["--resume", "{run}", "--batch-size", "4"],
            "--batch-size 4 --accum 1: with --resume the global batch must stay 8"),
    Mistake("train.py", ["--resume", "{run}", "--force"],
            "--force replaces a run folder and --resume continues one"),
    Mistake("train.py", ["--resume", "{mine}"], "--resume {mine}: {mine}/config.json is not the "
                                                "config of a run"),
]
EVAL = [
    eval_mistake(["{tmp}/nope"], "{tmp}/nope: no such run folder"),
    eval_mistake(["{mine}"], "{mine} is incomplete: config.json is missing"),
    eval_mistake(["{run}", "--nosuch"], "unrecognized arguments: --nosuch"),
    eval_mistake(["{run}", "--subject", "S09"], "unknown subject 'S09'"),
    eval_mistake(["{run}", "--export", "{tmp}/nodir/x.pt"],
                 "--export {tmp}/nodir/x.pt: no folder {tmp}/nodir to write it in"),
    eval_mistake(["{run}", "--export", "{notes}"],
                 "--export {notes}: already exists; choose a new file"),
    eval_mistake(["{run}", "--export", "{ro}/x.pt"], "--export {ro}/x.pt: cannot write in {ro} ("),
    eval_mistake(["{run}", "--export-hf", "{mine}"],
                 "--export-hf {mine}: already exists; choose a new folder"),
    eval_mistake(["{stage1}", "--export-hf", "{tmp}/hf"], "has no tuned backbone (adapter.pt)"),
    eval_mistake(["{run}", "--seeds", "{tmp}"],
                 "--seeds {tmp}: not the folder of a finished run (no results.json)"),
    eval_mistake(["{run}", "--seeds", "{run}"], "--seeds {run}: the same run as {run} (the run "
                                                "itself is the first of --seeds' group)"),
    eval_mistake(["{run}", "--seeds", "{stage1}", "{stage1}/"],
                 "--seeds {stage1}/: the same run as {stage1}"),
    eval_mistake(["{run}", "--vs", "{stage1}"], "--vs compares with the runs of --seeds"),
    eval_mistake(["{run}", "--against", "{run}"], "--against {run}: the run itself"),
    eval_mistake(["{run}", "--against", "{tmp}/nope"],
                 "--against {tmp}/nope: {tmp}/nope: no such run folder"),
    eval_mistake(["{run}", "--probe", "semantic", "--embeddings", "{tmp}/no.txt"],
                 "{tmp}/no.txt: no such embeddings file"),
    eval_mistake(["{run}", "--probe", "semantic", "--embeddings", "{emb}"],
                 "{emb}: line 2 is not a word and 3 finite numbers"),
    eval_mistake(["{run}", "--layers", "2,9"],
                 "--layers 2,9: expected 'all' or layers from 1..4 of tiny"),
    eval_mistake(["{run}", "--layers", "0"], "--layers 0: expected"),
    eval_mistake(["{run}", "--hours", "1"], "--hours sets --efficiency's subsets"),
    eval_mistake(["{run}", "--efficiency", "--hours", "inf"],
                 "argument --hours: expected hours, each a finite number > 0"),
    eval_mistake(["{run}", "--block", "5"], "--block sets --significance's blocks"),
    eval_mistake(["{run}", "--significance", "--block", "0"], arg("--block", "an integer >= 1")),
    eval_mistake(["{run}", "--significance", "--block", "100000"],
                 "--block 100000: the test rows of UTS01 (24 scored) make 0 block(s); the "
                 "permutation test needs two or more (choose --block 12 or less)"),
    eval_mistake(["{run}", "--downstream", "cremad"],
                 "--downstream cremad: give the task's folder with --downstream-data"),
    eval_mistake(["{run}", "--downstream", "cremad", "--downstream-data", "{tmp}"], "AudioWAV"),
    eval_mistake(["{run}", "--downstream-limit", "0"], arg("--downstream-limit", "an integer")),
    eval_mistake(["{stage1}", "--flatmap"], "stage-1 run (--epochs 0): there is no tuned r to map"),
    eval_mistake(["{rorun}", "--efficiency"], "the run folder {rorun}: cannot write in {rorun} ("),
    eval_mistake(["{rorun}", "--plot"], "the run folder {rorun}: cannot write in {rorun} ("),
    eval_mistake(["{rorun}", "--significance"], "the run folder {rorun}: cannot write in {rorun}"),
    eval_mistake(["{rorun}", "--export-hf", "{rorun}/hf"],
                 "--export-hf {rorun}/hf: cannot write in {rorun} ("),
    eval_mistake(["{rorun}", "--export", "{rorun}/tuned.pt"], "cannot write in {rorun} ("),
    eval_mistake(["{other}", "--layers"], "{other}/adapter.pt: made under --lora-rank 64, but "
                                          "config.json says 4; it is not this run's"),
    eval_mistake(["{run}"], f"{CACHE} {{notes}}: {{notes}} is a file",
                 env={"BRAINTUNE_CACHE": "{notes}"}),
]
BENCH = [
    Mistake("bench.py", ["--only", "ridge,nosuch"], "--only ridge,nosuch: unknown part 'nosuch'"),
    Mistake("bench.py", ["--out", "{tmp}/nodir/b.json"], "--out {tmp}/nodir/b.json: no folder"),
    Mistake("bench.py", ["--out", "{notes}"], "--out {notes}: already exists; choose a new file"),
    Mistake("bench.py", ["--out", "{ro}/b.json"], "--out {ro}/b.json: cannot write in {ro} ("),
    Mistake("bench.py", ["--quick", "--nosuch"], "unrecognized arguments: --nosuch"),
]
OTHERS = [
    synthetic_mistake(["{demo}"], "{demo}: already exists; choose a new folder"),
    synthetic_mistake(["{notes}"], "{notes}: already exists; choose a new folder"),
    synthetic_mistake(["{mine}"], "{mine}: already exists; choose a new folder"),
    synthetic_mistake(["{notes}/d"], "{notes}/d: {notes} is a file, where a folder must be"),
    synthetic_mistake(["{ro}/d"], "{ro}/d: cannot write in {ro} (", ("{ro}/d",)),
    synthetic_mistake([""], "the output: an empty path"),
    synthetic_mistake([], "the following arguments are required: out"),
    synthetic_mistake(D + ["--nosuch"], "unrecognized arguments: --nosuch"),
    synthetic_mistake(D + ["--voxels", "0"],
                      "argument --voxels: must be an integer >= 3 (got '0')"),
    synthetic_mistake(D + ["--voxels", "1.5"], "argument --voxels: must be an integer >= 3"),
    synthetic_mistake(D + ["--voxels", "2000000000"], (MEMORY, "of memory at once", "--voxels")),
    synthetic_mistake(D + ["--seconds", "5"],
                      "argument --seconds: must be a finite number >= 30 (got '5')"),
    synthetic_mistake(D + ["--seconds", "nan"], "argument --seconds: must be a finite number"),
    synthetic_mistake(D + ["--seconds", "inf"], "argument --seconds: must be a finite number"),
    synthetic_mistake(D + ["--seconds", "1e9"], (MEMORY, "of memory at once", "--seconds")),
    synthetic_mistake(D + ["--channels", "0"],
                      "argument --channels: must be an integer in [1, 8] (got '0')"),
    synthetic_mistake(D + ["--channels", "9"], "argument --channels: must be an integer in [1, 8]"),
    synthetic_mistake(D + ["--sr", "100"], "argument --sr: must be an integer in [8000, 384000]"),
    synthetic_mistake(D + ["--subjects", "0"], "argument --subjects: must be an integer >= 1"),
    synthetic_mistake(D + ["--subjects", "100000"], (MEMORY, "of disk, but", "--subjects")),
    synthetic_mistake(D + ["--stories", "1"], "argument --stories: must be an integer >= 2"),
    synthetic_mistake(D + ["--stories", "1000000"], (MEMORY, "--stories")),
    synthetic_mistake(D + ["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    words_mistake(W + ["--seconds", "0"],
                  "argument --seconds: must be a finite number in [0.025, 10] (got '0')"),
    words_mistake(W + ["--seconds", "nan"], "argument --seconds: must be a finite number"),
    words_mistake(W + ["--seconds=-1"], "argument --seconds: must be a finite number"),
    words_mistake(W + ["--seconds", "1e9"], "argument --seconds: must be a finite number"),
    words_mistake(["{demo}", "{notes}"], "{notes}: already exists; choose a new folder"),
    words_mistake(["{demo}", "{mine}"], "{mine}: already exists; choose a new folder"),
    words_mistake(["{demo}", "{notes}/w"], "{notes}/w: {notes} is a file, where a folder must be"),
    words_mistake(["{demo}", "{ro}/w"], "{ro}/w: cannot write in {ro} (", ("{ro}/w",)),
    words_mistake(["{tmp}/nodata", "{tmp}/w"], "{tmp}/nodata: no such folder; expected a dataset"),
    words_mistake(["{notes}", "{tmp}/w"], "{notes}: not a folder; expected a dataset"),
    words_mistake(["{nogrids}", "{tmp}/w"], "wheretheressmoke.wav: missing, or without a TextGrid"),
    words_mistake(["{pointer}", "{tmp}/w"], "avatar.wav: cannot read as WAV"),  # found late
    words_mistake(W + ["--test-story", "nosuch"], "nosuch.wav: missing, or without a TextGrid"),
    words_mistake(W + ["--valid-story", "wheretheressmoke"],
                  "--valid-story wheretheressmoke: expected another story"),
    words_mistake(["{demo}"], "the following arguments are required: out"),
    Mistake("tasks.py", [], "the following arguments are required: command"),
    Mistake("tasks.py", ["cut", "{demo}", "{tmp}/w"], "argument command: invalid choice: 'cut'"),
    fetch_mistake(["--base-url", "notaurl"], f"argument --base-url: {URL}"),
    fetch_mistake(["--base-url", "ftp://mirror/ds003020"], f"argument --base-url: {URL}"),
    fetch_mistake(["--base-url", "http://"], f"argument --base-url: {URL}"),
    fetch_mistake([], f"$BRAINTUNE_MIRROR: {URL}", env={"BRAINTUNE_MIRROR": "notaurl"}),
    fetch_mistake(["--out", "{notes}"], "{notes}: already holds a file"),
    fetch_mistake(["--out", "{mine}"], "{mine}: already holds notes.txt"),
    fetch_mistake(["--out", "{notes}/ds"],
                  "--out {notes}/ds: {notes} is a file, where a folder must be"),
    fetch_mistake(["--out", "{ro}/ds"], "--out {ro}/ds: cannot write in {ro} ("),
    fetch_mistake(["--subject", "UTS09"], "--subject UTS09: not a subject of ds003020"),
    Mistake("fetch.py", ["ds000001"], "argument dataset: invalid choice: 'ds000001'"),
    Mistake("fetch.py", [], "the following arguments are required: dataset"),
]


def snapshot(folders):
    """Every file under the folders with its size and time, every folder by name: what a command
    that left everything as it was leaves equal."""
    got = {}
    for top in folders:
        for d, subs, files in os.walk(top):
            got.update({os.path.join(d, s): "folder" for s in subs})
            for f in files:
                st = os.lstat(os.path.join(d, f))  # a link itself, broken or not
                got[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return got


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def check_mistake(row, ds, runs, read_only, tmp_path, cache, *, run):
    """Run the row's command (with run_all or run_processes) and check its refusal: non-zero exit,
    one line on stderr holding what it says, no traceback, nothing left behind or changed."""
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    places = dict(ds, **runs, tmp=tmp_path, notes=tmp_path / "notes.txt", mine=tmp_path / "mine",
                  ro=read_only, cache=cache)
    if any("{rorun}" in t for t in row.argv) and runs["rorun"] is None:
        pytest.skip("no folder here refuses this process a new file (chmod, chattr +i)")

    def fill(texts):
        return [t.format(**places) for t in texts]
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    env.update(zip(row.env, fill(v or "" for v in row.env.values())))
    env = {k: v for k, v in env.items() if row.env.get(k, "") is not None}
    folders = [tmp_path, os.path.dirname(ds["demo"]), os.path.dirname(ds["nogrids"]),
               os.path.dirname(runs["run"]), os.path.dirname(runs["stage1"])]
    before = snapshot(folders)
    kept = {p: open(p, "rb").read() for p in fill(row.kept)}
    says = fill([row.says] if isinstance(row.says, str) else row.says)
    cmd = [sys.executable, os.path.join(ROOT, row.script), *fill(row.argv)]
    result, = run([cmd], env, cwd=fill([row.cwd])[0])
    one_line(result, "")
    assert all(s in result[2] for s in says), (says, result[2])
    assert not [p for p in fill(row.absent) if os.path.lexists(p)]
    assert snapshot(folders) == before  # nothing left behind, nothing changed
    assert {p: open(p, "rb").read() for p in kept} == kept


MISTAKES = TRAIN + EVAL + BENCH + OTHERS


def test_the_table_holds_mistakes_of_every_command():
    scripts = {m.script for m in MISTAKES}
    assert scripts == {"train.py", "eval.py", "synthetic.py", "tasks.py", "bench.py", "fetch.py"}
    assert len(MISTAKES) >= 60


@pytest.mark.parametrize("row", MISTAKES, ids=[" ".join([m.script, *m.argv, *(
    f"{k}={v}" for k, v in m.env.items()), "in " + m.cwd]) for m in MISTAKES])
def test_each_mistake_is_refused_in_one_line_leaving_everything_as_it_was(row, ds, runs,
                                                                         read_only, tmp_path,
                                                                         shared_cache):
    check_mistake(row, ds, runs, read_only, tmp_path, shared_cache, run=run_all)


@pytest.mark.parametrize("script", sorted({m.script for m in MISTAKES}))
def test_each_script_refuses_in_a_process_of_its_own(script, ds, runs, read_only, tmp_path,
                                                     shared_cache):
    check_mistake(next(m for m in MISTAKES if m.script == script), ds, runs, read_only, tmp_path,
                  shared_cache, run=run_processes)


# -----------------------------------------------------------------------------
# what a row cannot check

def test_a_resumed_or_moved_run_works_from_anywhere(ds, tmp_path):
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    # the dataset given as a relative path, from its parent folder
    here = os.path.dirname(ds["demo"])
    (code, _, err), = run_all([[sys.executable, os.path.join(ROOT, "train.py"), "--data",
                                os.path.basename(ds["demo"]), "--model", "tiny", "--tiny-pretrain",
                                "0", "--epochs", "1", "--batch-size", "8", "--out",
                                str(tmp_path / "run")]], env, cwd=here)
    assert code == 0, err[-2000:]
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["args"]["data"] == ds["demo"]  # recorded absolute
    (code, out, err), = run_all([[sys.executable, os.path.join(ROOT, "eval.py"),
                                  str(tmp_path / "run"), "--subject", "S02"]], env, cwd=tmp_path)
    assert code == 0, err[-2000:]
    assert "cross-subject transfer to S02" in out
    assert not os.path.exists(tmp_path / "run" / ".lock")  # eval held it while it wrote
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    kept = {k: v for k, v in cfg["args"].items() if k not in ("tiny_pretrain", "backbone_dropout",
                                                              "no_cache")}
    # a run made before these flags
    (old / "config.json").write_text(json.dumps(dict(cfg, args=kept)))
    # today's default, not a KeyError
    assert config.parse(["--resume", str(old)]).backbone_dropout is None
    # the user's own command repeated with --resume: its flags, at their own values, change nothing
    again = config.parse(["--data", os.path.relpath(ds["demo"]), "--subject", "S01", "--roi",
                          "all", "--epochs", "3", "--seed", "0", "--alphas", "1e-1,1e8,19",
                          "--resume", str(tmp_path / "run")])
    assert (again.epochs, again.steered, again.roi.text) == (3, {"epochs": 3}, "all")


def test_force_replaces_a_run_folder_whole_and_only_a_run_folder(run, demo, tmp_path):
    old = shutil.copytree(run, tmp_path / "r")  # two epochs: adapter, checkpoint, metrics
    new = train.main(["--data", demo, "--model", "tiny", "--tiny-pretrain", "0", "--epochs", "0",
                      "--out", str(old), "--force"])
    assert new == str(old) and os.listdir(tmp_path) == ["r"]  # swapped in, nothing beside it
    assert sorted(os.listdir(old)) == ["blocks.pt", "config.json", "results.json", "stage1.pt",
                                       "voxel_r.npz"]  # nothing of the old run survives
    assert json.load(open(old / "config.json"))["args"]["epochs"] == 0


def test_a_run_folder_held_by_another_process_is_refused(run, tmp_path):
    held = shutil.copytree(run, tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, guard; guard.RunLock("
                               "sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(held)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot([held])
        env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
        says = f"{held}: in use by another process (pid {holder.pid}); wait for it to end"
        for cmd in (["train.py", "--resume", str(held), "--epochs", "3"],
                    ["eval.py", str(held), "--plot"]):
            one_line(run_all([[sys.executable, *cmd]], env)[0], says)
        assert snapshot([held]) == before
    finally:
        holder.kill()
        holder.wait()


def test_the_lambda_grid_is_refused_where_it_would_not_fit(demo, monkeypatch):
    args = config.parse(["--data", demo, "--model", "tiny", "--alphas", "1e-1,1e8,100000"])
    listings = preflight.list_subjects(args, ["S01"])
    need = preflight.grid_bytes(100000, 4 * 64, 90)  # tiny: 4 TR bins of 64 features, 90 voxels
    monkeypatch.setattr(preflight, "free_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match="^--alphas: a grid of 100000 lambdas needs about 590 MB "
                                         "at once in the ridge and cpu has 590 MB free; use "
                                         "fewer lambdas"):
        preflight.check_grid(args, listings, torch.device("cpu"))
    monkeypatch.setattr(preflight, "free_memory", lambda device: need)
    preflight.check_grid(args, listings, torch.device("cpu"))


def ctrl_c_delivered():
    """In the child before it starts: SIGINT as a terminal delivers it, even where the suite runs
    in the background of a shell without job control (which starts it with SIGINT ignored, and
    Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_stage_2_says_what_was_kept_and_the_resume_goes_on(demo, tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "train.py", "--data", demo, "--model", "tiny", "--tiny-pretrain", "0",
           "--batch-size", "8", "--epochs", "40", "--out", str(out)]
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    trainer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_delivered)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and trainer.poll() is None and \
            time.time() < deadline:
        time.sleep(0.05)
    trainer.send_signal(signal.SIGINT)
    _, err = trainer.communicate(timeout=120)
    done = runfolder.epochs_done(str(out))
    assert trainer.returncode == 130 and done >= 1, err
    assert err.splitlines() == [f"interrupted; {out} keeps epoch {done}; resume with: python "
                                f"train.py --resume {out}"]
    assert not os.path.exists(out / ".lock")
    resumed = train.main(["--resume", str(out), "--epochs", str(done + 1)])
    assert runfolder.epochs_done(resumed) == done + 1


def test_ctrl_c_while_the_synthetic_dataset_is_written_leaves_nothing(tmp_path):
    out = tmp_path / "d"
    writer = subprocess.Popen([sys.executable, "synthetic.py", str(out), "--seconds", "3000"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              preexec_fn=ctrl_c_delivered)
    deadline = time.time() + 120
    while not os.listdir(tmp_path) and writer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.listdir(tmp_path) == [f"d.braintune-tmp{writer.pid}"]
    time.sleep(0.5)  # into the first story's audio
    writer.send_signal(signal.SIGINT)
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 130, err
    assert err.splitlines() == ["interrupted; nothing was written (the half-made folder was "
                                "removed)"]
    assert os.listdir(tmp_path) == []


def test_a_half_made_folder_of_a_killed_process_is_removed_and_a_users_own_is_not(tmp_path):
    import cache
    (tmp_path / "d.tmp").mkdir()  # the user's own folder, of the name a half-made one once had
    (tmp_path / "d.tmp" / "notes.txt").write_text("keep")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"d.braintune-tmp{dead}").mkdir()  # a killed writer's
    with cache.atomic_folder(str(tmp_path / "d")) as tmp:
        os.makedirs(tmp)
    assert sorted(os.listdir(tmp_path)) == ["d", "d.tmp"]
    assert (tmp_path / "d.tmp" / "notes.txt").read_text() == "keep"


def test_the_synthetic_footprint_on_which_its_refusals_rest_matches_what_it_writes(demo):
    # the demo fixture's make_demo arguments
    need = synthetic.footprint(3, 5, 90, 60.0, sr=synthetic.DEMO_SR, channels=1)
    wrote = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(demo) for f in fs)
    assert 0.9 < need.disk / wrote < 1.1, (need.disk, wrote)
