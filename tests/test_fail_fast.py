"""Every mistake a user can make on the command line is refused in one clear line, before any costly
work: non-zero exit, no traceback, the flag or file named, nothing written."""
import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

import config
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
         "--context or --batch-size: this run would need about"),
        (["--protocol", "brainwavlm", "--test-skip", "0", "--context", "100000"],
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


def test_data_refuses_each_mistake(ds, tmp_path):
    cases = [
        ([sys.executable, "synthetic.py", ds["demo"]], "already exists"),
        ([sys.executable, "synthetic.py", str(tmp_path / "d"), "--voxels", "0"],
         "--voxels 0: must be at least 3"),
        ([sys.executable, "synthetic.py", str(tmp_path / "d"), "--seconds", "5"],
         "--seconds 5.0: must be at least 30"),
        ([sys.executable, "synthetic.py", str(tmp_path / "d"), "--channels", "0"],
         "--channels 0: must be 1 to 8"),
    ]
    env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / "cache"))
    assert_refused(run_processes([cases[1][0]], env), cases[1:2])
    assert_refused(run_all([c for c, _ in cases], env), cases, made=[tmp_path / "d",
                                                                     tmp_path / "d.tmp"])


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
