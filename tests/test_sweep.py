import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import compare
import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["lr=1e-2", "lr=3e-3"]


def run_sweep(cwd, argv):
    """sweep.main(argv) run from folder cwd: (its result, what it printed)."""
    old, out = os.getcwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            result = sweep.main(argv)
    finally:
        os.chdir(old)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def swept(demo, tmp_path_factory):
    """A finished sweep of two settings with two seeds each: four one-epoch runs of tiny, two at
    once. Returns (the folder it ran from, its command, what it printed)."""
    cwd = str(tmp_path_factory.mktemp("sweep"))
    argv = ["two", "--vary", "lr=1e-2,3e-3", "--seeds", "0,1", "--jobs", "2", "--", "--data", demo,
            "--model", "tiny", "--epochs", "1", "--batch-size", "8", "--tiny-pretrain", "1"]
    _, printed = run_sweep(cwd, argv)
    return cwd, argv, printed


def folder(cwd, name=""):
    return os.path.join(cwd, "sweeps", "two", name)


def refit_r(run):
    return json.load(open(os.path.join(run, "results.json")))["test"]["all"]["refit_r"]


def test_a_sweep_makes_a_run_folder_per_setting_and_seed_and_skips_finished_ones(swept):
    cwd, argv, _ = swept
    names = [f"{s},seed={seed}" for s in SETTINGS for seed in (0, 1)]
    for name in names:
        for f in ("config.json", "results.json", "voxel_r.npz", "blocks.pt", "adapter.pt"):
            assert os.path.isfile(os.path.join(folder(cwd, name), f)), (name, f)
        cfg = json.load(open(os.path.join(folder(cwd, name), "config.json")))["args"]
        assert cfg["seed"] == int(name[-1]) and cfg["lr"] == float(name[3:name.index(",")])
    for f in ("sweep.json", "report.md", "report.json", "sweep.png", "logs"):
        assert os.path.exists(folder(cwd, f)), f
    # the first run alone (it fills the caches the others share), then two at once
    lines = swept[2].splitlines()
    started = {n: next(i for i, x in enumerate(lines) if x.startswith(f"started {n}:"))
               for n in names}
    finished = {n: next(i for i, x in enumerate(lines) if x.startswith(f"finished {n} in"))
                for n in names}
    assert finished[names[0]] < min(started[n] for n in names[1:])
    assert max(started[names[1]], started[names[2]]) < min(finished[names[1]], finished[names[2]])
    times = [os.path.getmtime(os.path.join(folder(cwd, n), "results.json")) for n in names]
    _, printed = run_sweep(cwd, argv)  # again: every run finished, none run again
    assert "4 of 4 runs finished, 0 to run" in printed and "started" not in printed
    assert times == [os.path.getmtime(os.path.join(folder(cwd, n), "results.json"))
                     for n in names]


def oracle(folders, sets_, resamples, seed=0):
    """The change's interval by hand: each resample's blocks and seeds drawn as the sweep draws
    them, each run's r per voxel rebuilt by numpy from its blocks' sums, the drawn seeds
    averaged. folders[s][k]: setting k's run with seed s; sets_[s]: seed s's voxel sets."""
    blocks = [[torch.load(os.path.join(f, "blocks.pt"), weights_only=True)["subjects"]["UTS01"]
               for f in row] for row in folders]
    n_blocks, n_seeds = len(blocks[0][0]["baseline"]["rows"]), len(folders)
    draws = np.random.default_rng(seed).integers(0, n_blocks, (resamples, n_blocks))
    seeds = np.random.default_rng(seed + 1).integers(0, n_seeds, (resamples, n_seeds))
    out = np.zeros((resamples, len(sets_[0]), len(folders[0])))
    for i, (d, picked) in enumerate(zip(draws, seeds)):
        for s in picked:
            for k, b in enumerate(blocks[s]):
                mean = {}
                for part in ("baseline", "refit"):
                    S = b[part]["sums"].numpy()[d].sum(0)  # (5, voxels)
                    N = b[part]["rows"].numpy()[d].sum()
                    r = (N * S[4] - S[0] * S[1]) / np.sqrt((N * S[2] - S[0] ** 2) *
                                                           (N * S[3] - S[1] ** 2))
                    mean[part] = np.array([r[idx].mean() for idx in sets_[s].values()])
                out[i, :, k] += (mean["refit"] - mean["baseline"]) / n_seeds
    return np.percentile(out, [2.5, 97.5], axis=0)  # (2, sets, settings)


def test_the_tables_intervals_equal_a_direct_computation_and_voxel_sets_are_the_references(
        swept, demo):
    cwd, *_ = swept
    stats = json.load(open(folder(cwd, "report.json")))
    rois = dict(np.load(os.path.join(demo, "derivative", "rois", "UTS01.npz")))
    runs = [[folder(cwd, f"{s},seed={seed}") for s in SETTINGS] for seed in (0, 1)]
    sets_ = []
    for row in runs:  # the reference run of each seed: its usable voxels, ROIs and top tenth
        good = np.flatnonzero(np.isfinite(np.load(os.path.join(row[0], "voxel_r.npz"))[
            "baseline_r"]))
        cv = torch.load(os.path.join(row[0], "stage1.pt"), weights_only=True)["subjects"][0]
        top = good[np.argsort(-cv["init"]["cv_r"].numpy()[good])[:len(good) // 10]]
        sets_.append({"all": good, **{k: np.intersect1d(v, good) for k, v in rois.items()},
                      f"top{len(good) // 10}": top})
    assert list(stats["sets"]) == list(sets_[0])
    want = oracle(runs, sets_, stats["resamples"])
    for j, name in enumerate(sets_[0]):
        for k, setting in enumerate(SETTINGS):
            row = stats["sets"][name][setting]
            np.testing.assert_allclose(row["change_ci"], want[:, j, k], rtol=1e-6, atol=1e-9)
            changes = [refit_r(r[k]) - json.load(open(os.path.join(r[k], "results.json")))[
                "test"]["all"]["baseline_r"] for r in runs] if name == "all" else None
            if changes:  # the point: the mean over seeds of results.json's change
                assert row["change"] == pytest.approx(np.mean(changes), abs=1e-6)
                assert row["sd"] == pytest.approx(np.std(changes, ddof=1), abs=1e-6)
    other = stats["sets"]["AC"][SETTINGS[1]]
    assert other["difference"] == pytest.approx(
        other["change"] - stats["sets"]["AC"][SETTINGS[0]]["change"], abs=1e-9)
    assert other["difference_ci"][0] <= other["difference"] <= other["difference_ci"][1]


def test_two_identical_settings_differ_by_zero_and_holm_counts_every_comparison(swept):
    cwd, *_ = swept
    same = [compare.read_seed([folder(cwd, f"{SETTINGS[0]},seed={s}")] * 2, s) for s in (0, 1)]
    stats = compare.sweep_statistics(same, ["a", "b"])
    for rows in stats["sets"].values():
        b = rows["b"]
        assert b["difference"] == 0 and b["difference_ci"] == [0.0, 0.0] and b["p"] == 1.0
        assert not b["holm"] and rows["a"]["change_ci"] == b["change_ci"]
    assert stats["comparisons"] == 4  # one per voxel set
    # Holm by hand: m = 4, thresholds 0.0125, 0.0167, 0.025, 0.05, stopping at the first failure
    assert compare.holm([0.01, 0.04, 0.016, 0.3]).tolist() == [True, False, True, False]
    assert compare.holm([0.02, 0.001, 0.03, 0.04]).tolist() == [False, True, False, False]
    d = np.array([[0.1, -0.2, 0], [0.2, -0.1, 0], [0.3, -0.3, 0], [0.4, 0.2, 0]])  # 4 resamples
    np.testing.assert_allclose(compare.bootstrap_p(d), [2 * 1 / 5, 2 * 2 / 5, 1.0])


def test_a_killed_run_is_resumed_and_the_slurm_task_runs_one(swept):
    cwd, argv, _ = swept
    killed = folder(cwd, f"{SETTINGS[1]},seed=1")  # stopped after its last checkpoint
    want = refit_r(killed)
    for f in ("results.json", "voxel_r.npz", "blocks.pt", "adapter.pt"):
        os.remove(os.path.join(killed, f))
    _, printed = run_sweep(cwd, argv[:argv.index("--jobs")] + argv[argv.index("--"):])
    assert f"--resume {killed}" in printed and "3 of 4 runs finished, 1 to run" in printed
    assert refit_r(killed) == pytest.approx(want, abs=1e-4)
    run_sweep(cwd, ["two", "--slurm"])
    script = open(folder(cwd, "slurm.sh")).read()
    assert "#SBATCH --array=0-3" in script
    gone = folder(cwd, f"{SETTINGS[0]},seed=1")  # the array's task 1
    want = refit_r(gone)
    shutil.rmtree(gone)
    # one thread, as --jobs 2 ran it: tiny's steps at lr 1e-2 amplify the threads' rounding
    one = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for task in ("1", "0"):  # task 0's run has finished: it is left alone
        done = subprocess.run(["bash", folder(cwd, "slurm.sh")], capture_output=True, text=True,
                              env=dict(one, SLURM_ARRAY_TASK_ID=task))
        assert done.returncode == 0, done.stderr[-2000:]
    assert "finished" in done.stdout and refit_r(gone) == pytest.approx(want, abs=1e-4)


def test_the_eval_columns_are_read_from_analyses_json_and_run_where_missing(swept, tmp_path):
    cwd, *_ = swept
    run = str(tmp_path / "run")
    shutil.copytree(folder(cwd, f"{SETTINGS[0]},seed=0"), run)
    a = sweep.parser().parse_args(["two", "--probe", "semantic", "--subject", "S02"])
    assert sweep.eval_flags(sweep.Run("r", run, "s", 0, []), a) == ["--probe", "semantic",
                                                                    "--subject", "S02"]
    analyses = {"probe_semantic": {"pretrained": 0.5, "tuned": 0.56},
                "transfer_UTS02": {"all": {"baseline_r": 0.2, "refit_r": 0.23}}}
    json.dump(analyses, open(os.path.join(run, "analyses.json"), "w"))
    got = compare.analyses_deltas(run, "semantic", "S02")
    assert got["probe"] == pytest.approx(0.06) and got["transfer"] == pytest.approx(0.03)
    assert sweep.eval_flags(sweep.Run("r", run, "s", 0, []), a) == []


def test_bad_sweeps_are_refused_before_any_run(swept, demo, tmp_path):
    cwd, argv, _ = swept
    flags = ["--", "--data", demo, "--model", "tiny", "--epochs", "1"]
    cases = [(["--vary", "lora-rnak=4,8", "--seeds", "0"], "train.py has no flag --lora-rnak"),
             (["--vary", "lora-rank=4,-1", "--seeds", "0"],
              "argument --lora-rank: must be an integer >= 0"),
             (["--vary", "loss=mse,foo", "--seeds", "0"], "invalid choice: 'foo'"),
             (["--vary", "roi=AC,nosuch", "--seeds", "0"], "unknown ROI 'nosuch'"),
             (["--vary", "force=1", "--seeds", "0"], "--force takes no value"),
             (["--vary", "lr=1e-2,1e-2", "--seeds", "0"], "with distinct values"),
             (["--vary", "lr=1e-2,3e-3", "--seeds", "0", "--", "--lr", "1"], "both in --vary and"),
             (["--vary", "lr=1e-2", "--seeds", ""], "--seeds (not given): expected distinct"),
             (["--vary", "lr=1e-2"], "--seeds (not given): expected distinct"),
             (["--vary", "lr=1e-2", "--seeds", "1,0,1"], "--seeds 1,0,1: expected distinct"),
             (["--vary", "lr=1e-2", "--seeds", "0", "--", "--seed", "3"], "--seed after --"),
             (["--vary", "subject=S01,S02", "--seeds", "0"], "--subject cannot be varied"),
             (["--seeds", "0", "--", "--history", "x"],
              "argument --history: must be an integer >= 1 (got 'x')")]
    for args, message in cases:
        given = args + (flags[1:] if "--" in args else flags)
        with pytest.raises(ValueError, match=re.escape(message)):
            run_sweep(str(tmp_path), ["new"] + given)
    assert not os.path.exists(tmp_path / "sweeps")  # nothing written
    changed = argv[:argv.index("--seeds") + 1] + ["0,1,2"] + argv[argv.index("--seeds") + 2:]
    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(cwd, changed)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), "x", "--seeds", "0",
                           "--vary", "nope=1"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: --vary nope=1: train.py has no flag --nope"]
