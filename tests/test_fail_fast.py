"""Every mistake a user can make on the command line is refused in one clear line, before any costly
work: non-zero exit, no traceback, the flag or file named, nothing written."""
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

import pytest
import torch

import config
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


def assert_refused(results, cases, made=()):
    for (code, stdout, stderr), (_, message) in zip(results, cases):
        lines = stderr.strip().splitlines()
        assert code != 0 and "Traceback" not in stderr, (message, stderr[-1500:])
        assert len(lines) == 1 and message in lines[0], (message, stderr)
        # refused before extraction and ridge
        assert "ridge" not in stdout and "windows of" not in stdout
    for path in made:
        assert not os.path.exists(path), f"{path} was written"


@pytest.fixture(scope="module")
def ds(demo, tmp_path_factory):
    """The demo dataset, and copies of it broken the ways a user's can be."""
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
    return {"demo": demo, "nogrids": str(nogrids), "unfetched": str(unfetched),
            "pointer": str(pointer)}


def test_train_refuses_each_mistake_before_any_work(ds, tmp_path):
    np_roi = tmp_path / "mine.npy"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    cases = [  # (flags, what the one line must say)
        (["--roi", "V7"], "unknown ROI 'V7' for UTS01"),
        (["--roi", "topx"], "--roi topx: expected topN"),
        (["--roi", "top0"], "--roi top0: expected topN"),
        (["--roi", "top100000"], "--roi top100000: UTS01 has 90 voxels"),
        (["--roi", str(np_roi)], f"{np_roi}: no such ROI file"),
        (["--subject", "S01,S02", "--roi", "mine.npy"],
         "a .npy file holds one subject's voxel indices"),
        (["--subject", "S07"], "unknown subject 'S07'"),
        (["--model", "nosuch"], "--model nosuch: unknown"),
        (["--layer", "9"], "--layer 9: tiny has layers 1..4"),
        (["--layer", "abc"], "--layer abc: tiny has layers 1..4"),
        (["--alphas", "1,2"], "--alphas 1,2: expected first,last,count"),
        (["--lr", "-1"], "--lr -1.0: must be positive"),
        (["--bottleneck", "-5"], "--bottleneck -5: must be 0 (none) or more"),
        (["--tr", "0"], "--tr 0.0: must be positive"),
        (["--sound-start", "-100"], "audio is 60.0 s long but its last fMRI frame needs"),
        (["--lora-targets", "qxz"], "--lora-targets qxz: must be letters of qkvo"),
        (["--lora-dropout", "1.5"], "--lora-dropout 1.5: must be in [0, 1)"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"],
         "CUDA device(s); use --device cpu"),
        (["--val-stories", "wheretheressmoke"],
         "--val-stories wheretheressmoke and --test-stories wheretheressmoke"),
        (["--val-stories", "nosuchstory"], "story 'nosuchstory' has no responses for UTS01"),
        (["--cv-folds", "12"], "--cv-folds 12: UTS01 has 4 training stories"),
        (["--weights", str(tmp_path / "nope.pt")], "nope.pt: no such file"),
        (["--data", ds["nogrids"], "--tiny-pretrain", "4"],
         "alternateithicatom.TextGrid: no such file; tiny's phone pretraining"),
        (["--data", ds["unfetched"]],
         "souls.hf5: not fetched yet (a datalad placeholder); run `datalad get"),
        (["--data", ds["pointer"]], "avatar.wav: not fetched yet"),
        (["--data", str(tmp_path / "nodata")], "preprocessed_data: no such folder"),
        (["--out", str(tmp_path / "taken")], "already exists; use --resume"),
        (["--context", "3"],
         "--context: a setting of moussa2025 or brainwavlm, not of --protocol windows"),
        (["--protocol", "brainwavlm", "--delays", "a,b"], "--delays a,b: expected TR delays"),
        (["--protocol", "moussa2025", "--stride", "0"], "--stride 0.0: must be positive"),
        (["--protocol", "moussa2025"],
         "--test-skip 40: the test story 'wheretheressmoke' of UTS01 has 24 rows"),
        (["--sound-start", "400"], "its first fMRI frame is at -379.0 s, before the audio starts"),
        (["--sound-start", "1e9"],
         "before the audio starts (see --sound-start, --trim-start, --tr)"),
        (["--history", "1000"], "--history 1000: longer than the shortest training story (24 TRs)"),
        (["--bottleneck", "100000"],
         "--bottleneck 100000: larger than the features (384) or the voxels (90)"),
        (["--lora-rank", "65"], "--lora-rank 65: must be at most the layer's width, 64 (tiny)"),
        (["--protocol", "brainwavlm", "--test-skip", "0", "--context", "100000"],
         "--infer-batch or --context: stage 1 would need about"),
        (["--model", "wavlm_base_plus", "--epochs", "1", "--history", "12", "--batch-size", "96"],
         "smaller (--batch-size B/N --accum N keeps the global batch of B)"),
        (["--control-block", "0"], "--control-block 0: must be at least 1"),
    ]
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    base = [sys.executable, "train.py", "--data", ds["demo"], "--model", "tiny", "--tiny-pretrain",
            "0",
            "--epochs", "0", "--out", str(tmp_path / "run")]
    results = run_all([base + flags for flags, _ in cases], env)
    assert_refused(results, cases, made=[tmp_path / "run", tmp_path / "cache"])
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_a_resumed_or_moved_run_works_from_anywhere_and_a_broken_one_is_refused(ds, tmp_path):
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
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    kept = {k: v for k, v in cfg["args"].items() if k not in ("tiny_pretrain", "backbone_dropout",
                                                              "no_cache")}
    # a run made before these flags
    (old / "config.json").write_text(json.dumps(dict(cfg, args=kept)))
    # today's default, not a KeyError
    assert config.parse(["--resume", str(old)]).backbone_dropout is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    results = run_processes([[sys.executable, "train.py", "--resume", str(broken)]], env)
    message = f"--resume {broken}: {broken}/config.json is not the config of a run"
    assert_refused(results, [(None, message)])
    resume = [sys.executable, "train.py", "--resume", str(tmp_path / "run")]
    cases = [(resume + ["--lr", "1"], "--lr: given with --resume, it would change the run"),
             (resume + ["--roi", "AC"], "--roi: given with --resume, it would change the run"),
             (resume + ["--batch-size", "4"],
              "--batch-size 4 --accum 1: with --resume the global batch must stay 8"),
             (resume + ["--epochs", "-1"], "--epochs -1: must be 0 or more")]
    before = open(tmp_path / "run" / "config.json").read()
    assert_refused(run_all([c for c, _ in cases], env), cases)
    assert open(tmp_path / "run" / "config.json").read() == before  # nothing written


def test_eval_refuses_each_mistake(ds, tmp_path):
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    run = train.main(["--data", ds["demo"], "--model", "tiny", "--tiny-pretrain", "0", "--epochs",
                      "0",
                      "--out", str(tmp_path / "run")])
    ev = [sys.executable, "eval.py", run]
    cases = [
        ([sys.executable, "eval.py", str(tmp_path / "nope")], "nope: no such run folder"),
        (ev + ["--export", str(tmp_path / "nodir" / "x.pt")],
         f"--export {tmp_path}/nodir/x.pt: no folder"),
        (ev + ["--export", os.path.join(run, "config.json")], "config.json: already exists"),
        (ev + ["--seeds", str(tmp_path)], f"--seeds {tmp_path}: not the folder of a finished run"),
        (ev + ["--vs", run], "--vs compares with the runs of --seeds"),
        (ev + ["--subject", "S09"], "unknown subject 'S09'"),
        (ev + ["--probe", "semantic", "--embeddings", str(tmp_path / "no.txt")], "--embeddings"),
        (ev + ["--layers", "2,9"], "--layers 2,9: expected 'all' or layers from 1..4 of tiny"),
        (ev + ["--layers", ""], "--layers : expected 'all' or layers from 1..4"),
        (ev + ["--layers", "0"], "--layers 0: expected"),
        (ev + ["--export-hf", str(tmp_path / "hf")], "has no tuned backbone (adapter.pt)"),
        (ev + ["--hours", "1"], "--hours sets --efficiency's subsets; give --efficiency too"),
        (ev + ["--efficiency", "--hours", "x"], "--hours x: expected positive hours"),
        (ev + ["--against", str(tmp_path / "nope")],
         f"--against {tmp_path}/nope: {tmp_path}/nope: no such run folder"),
        (ev + ["--downstream", "cremad"],
         "--downstream cremad: give the task's folder with --downstream-data"),
        (ev + ["--downstream", "cremad", "--downstream-data", str(tmp_path)], "AudioWAV"),
        (ev + ["--flatmap"], "stage-1 run (--epochs 0): there is no tuned r to map"),
    ]
    made = [tmp_path / "nodir", os.path.join(run, "analyses.json")]
    assert_refused(run_processes([cases[0][0]], env), cases[:1])
    assert_refused(run_all([c for c, _ in cases], env), cases, made=made)


def test_bench_refuses_each_mistake(tmp_path):
    cases = [
        ([sys.executable, "bench.py", "--only", "ridge,nosuch"],
         "--only ridge,nosuch: unknown part 'nosuch'"),
        ([sys.executable, "bench.py", "--out", str(tmp_path / "nodir" / "b.json")],
         f"--out {tmp_path}/nodir/b.json: no folder"),
    ]
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    assert_refused(run_processes([cases[0][0]], env), cases[:1])
    assert_refused(run_all([c for c, _ in cases], env), cases, made=[tmp_path / "nodir",
                                                                     tmp_path / "cache"])


# -----------------------------------------------------------------------------
# one table: each row a command run with a mistake; train.py's, eval.py's and bench.py's to come

@dataclass
class Mistake:
    """A command run with a mistake. Its texts are filled in from the case's places: {tmp} a folder
    of its own (the working folder, $BRAINTUNE_CACHE inside), {demo} the demo dataset, {notes} a
    user's file, {mine} a user's folder holding notes.txt, {ro} a folder this process cannot write
    in, {nogrids} and {pointer} the broken datasets of the ds fixture."""
    script: str  # synthetic.py, tasks.py, fetch.py
    argv: list  # its arguments
    says: str | tuple  # what the one line on stderr holds (each of them)
    absent: tuple = ()  # paths that must not exist afterwards
    kept: tuple = ("{notes}", "{mine}/notes.txt")  # the user's files, unchanged
    env: dict = field(default_factory=dict)  # environment variables set for it


def synthetic_mistake(argv, says, absent=("{tmp}/d", "{tmp}/d.tmp")):
    return Mistake("synthetic.py", argv, says, absent)


def words_mistake(argv, says, absent=("{tmp}/w", "{tmp}/w.tmp")):
    return Mistake("tasks.py", ["words", *argv], says, absent)


def fetch_mistake(argv, says, env=None):
    return Mistake("fetch.py", ["ds003020", *argv], says, ("{tmp}/ds", "{tmp}/ds003020"),
                   env=env or {})


D = ["{tmp}/d"]
W = ["{demo}", "{tmp}/w"]
URL = "expected an http:// or https:// address such as https://s3.amazonaws.com"
MEMORY = "the synthetic dataset needs about"
MISTAKES = [
    synthetic_mistake(["{demo}"], "{demo}: already exists; choose a new folder"),
    synthetic_mistake(["{notes}"], "{notes}: already exists; choose a new folder"),
    synthetic_mistake(["{mine}"], "{mine}: already exists; choose a new folder"),
    synthetic_mistake(["{notes}/d"], "{notes}/d: {notes} is a file, where a folder must be"),
    synthetic_mistake(["{ro}/d"], "{ro}/d: cannot write in {ro} (", ("{ro}/d", "{ro}/d.tmp")),
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
    words_mistake(["{demo}", "{ro}/w"], "{ro}/w: cannot write in {ro} (", ("{ro}/w", "{ro}/w.tmp")),
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


def check_mistake(row, ds, read_only, tmp_path, run):
    """Run the row's command (with run_all or run_processes) and check its refusal: non-zero exit,
    one line on stderr holding what it says, no traceback, nothing left behind or changed."""
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    places = dict(tmp=tmp_path, demo=ds["demo"], notes=tmp_path / "notes.txt",
                  mine=tmp_path / "mine", ro=read_only, nogrids=ds["nogrids"],
                  pointer=ds["pointer"])

    def fill(texts):
        return [t.format(**places) for t in texts]
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"),
               **dict(zip(row.env, fill(row.env.values()))))
    folders = [tmp_path, os.path.dirname(ds["demo"]), os.path.dirname(ds["nogrids"])]
    before = snapshot(folders)
    kept = {p: open(p, "rb").read() for p in fill(row.kept)}
    says = fill([row.says] if isinstance(row.says, str) else row.says)
    cmd = [sys.executable, os.path.join(ROOT, row.script), *fill(row.argv)]
    (code, _, stderr), = run([cmd], env, cwd=tmp_path)
    lines = stderr.strip().splitlines()
    assert code != 0 and "Traceback" not in stderr, stderr[-1500:]
    assert len(lines) == 1 and all(s in lines[0] for s in says), (says, stderr)
    assert not [p for p in fill(row.absent) if os.path.lexists(p)]
    assert snapshot(folders) == before  # nothing left behind, nothing changed
    assert {p: open(p, "rb").read() for p in kept} == kept


@pytest.mark.parametrize("row", MISTAKES, ids=[" ".join([m.script, *m.argv]) for m in MISTAKES])
def test_each_mistake_is_refused_in_one_line_leaving_everything_as_it_was(row, ds, read_only,
                                                                         tmp_path):
    check_mistake(row, ds, read_only, tmp_path, run_all)


@pytest.mark.parametrize("script", sorted({m.script for m in MISTAKES}))
def test_each_script_refuses_in_a_process_of_its_own(script, ds, read_only, tmp_path):
    check_mistake(next(m for m in MISTAKES if m.script == script), ds, read_only, tmp_path,
                  run_processes)


def test_the_synthetic_footprint_on_which_its_refusals_rest_matches_what_it_writes(demo):
    # the demo fixture's make_demo arguments
    need = synthetic.footprint(3, 5, 90, 60.0, sr=synthetic.DEMO_SR, channels=1)
    wrote = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(demo) for f in fs)
    assert 0.9 < need.disk / wrote < 1.1, (need.disk, wrote)


def test_ctrl_c_while_the_synthetic_dataset_is_written_leaves_nothing(tmp_path):
    out = tmp_path / "d"
    writer = subprocess.Popen([sys.executable, "synthetic.py", str(out), "--seconds", "3000"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "d.tmp").exists() and writer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the first story's audio
    writer.send_signal(signal.SIGINT)
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 130, err
    assert err.splitlines() == ["interrupted; nothing was written (the half-made folder was "
                                "removed)"]
    assert os.listdir(tmp_path) == []
