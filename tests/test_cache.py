import functools
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

import h5py
import numpy as np
import pytest
import torch

import cache
import data
import train
from test_train import count_windows
from features import window_features
from model import Extractor, load_backbone, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entries(kind):
    d = os.path.join(cache.cache_root(), kind)
    return sorted(e for e in os.listdir(d) if ".tmp" not in e) if os.path.isdir(d) else []


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache of the test's own."""
    monkeypatch.setenv("BRAINTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stage1_run(demo, out, *extra):
    return train.main(["--data", demo, "--model", "tiny", "--tiny-pretrain", "0", "--epochs", "0",
                       "--out", str(out),
                       *extra])


def test_cold_warm_and_off_give_the_same_results(demo, fresh, tmp_path, monkeypatch):
    forwarded = count_windows(monkeypatch)
    runs = {}
    for name, extra in (("cold", []), ("warm", []), ("off", ["--no-cache"])):
        forwarded.clear()
        runs[name] = stage1_run(demo, tmp_path / name, "--epochs", "1", "--batch-size", "8",
                                *extra), sum(forwarded)
    # training and test windows, forwarded in stage 1 and for the refit unless the cache has them:
    # the warm
    # run tunes the very same backbone, so even its refit features are in the cache
    n_stage1 = 96 + 24
    assert runs["warm"][1] == runs["cold"][1] - 2 * n_stage1 and runs["off"][1] == runs["cold"][1]
    assert not any(e.startswith("nocache") for e in os.listdir(fresh))  # --no-cache leaves nothing
    s1 = {k: load_checkpoint(os.path.join(run, "stage1.pt"))["subjects"][0]["init"]
          for k, (run, _) in runs.items()}
    r = {k: np.load(os.path.join(run, "voxel_r.npz")) for k, (run, _) in runs.items()}
    for k in ("warm", "off"):
        torch.testing.assert_close(s1[k]["mu"], s1["cold"]["mu"])  # feature means
        torch.testing.assert_close(s1[k]["W"], s1["cold"]["W"])
        # and stage 2 does not depend on what the cache spared
        for key in ("baseline_r", "tuned_r", "refit_r"):
            np.testing.assert_allclose(r[k][key], r["cold"][key], rtol=1e-5, atol=1e-6)
    # the responses the cache holds are the hf5's, z-scored per story (numpy, float64, as the
    # oracle)
    ds, _ = data.prepare(demo, ["S01"])
    d = ds[0]
    with h5py.File(data.response_path(demo, "UTS01", d.stories["train"][1]), "r") as f:
        want = f["data"][:]
    want = (want - want.mean(0)) / want.std(0)
    rows = slice(d.Y["train"].starts[1], d.Y["train"].starts[2])
    np.testing.assert_allclose(d.Y["train"][:, :][rows].numpy(), want, atol=2e-6)
    some = d.Y["train"][np.arange(rows.start, rows.stop), 5:9].numpy()
    np.testing.assert_allclose(some, want[:, 5:9], atol=2e-6)


def test_each_input_of_a_key_misses(demo, fresh, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(demo, root)
    root = str(root)
    story = "souls"
    data.story_responses(root, "UTS01", story)
    data.story_responses(root, "UTS01", story)
    assert len(entries("responses")) == 1  # the same file: a hit
    path = data.response_path(root, "UTS01", story)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # touched: its time changed
    data.story_responses(root, "UTS01", story)
    assert len(entries("responses")) == 2
    with h5py.File(path, "r+") as f:  # new values, same size and time
        f["data"][0, 0] += 1
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    changed = data.story_responses(root, "UTS01", story)["data"][0, 0]
    assert changed != data.story_responses(demo, "UTS01", story)["data"][0, 0]
    data.load_audio(root, [story])
    os.utime(data.wav_path(root, story), ns=(time.time_ns(), time.time_ns() + 2 * 10 ** 9))
    data.load_audio(root, [story])
    assert len(entries("audio")) == 2
    # features: every setting that changes them misses, the same call hits
    waves = data.load_audio(root, [story])
    keys = {story: cache.file_key(data.wav_path(root, story))}
    model = load_backbone("tiny", seed=0)
    other = load_backbone("tiny", seed=1)
    cpu = torch.device("cpu")

    def extract(bb=model, layer=2, history=3, normalize=False, **timing):
        w = data.Windows(waves, {story: 10}, [story], history=history, keys=keys, **timing)
        ex = Extractor("tiny", bb, layer, normalize)
        return window_features(functools.partial(ex.pooled, history=history), w, ex.key(), cpu,
                               batch_size=4)
    first = extract()
    n = len(entries("features"))
    assert torch.equal(extract(), first) and len(entries("features")) == n
    for change in (dict(bb=other), dict(layer=3), dict(history=4), dict(normalize=True),
                   dict(tr=2.0),
                   dict(trim_start=9), dict(sound_start=9.0)):
        extract(**change)
        assert len(entries("features")) == n + 1, change
        n += 1
    # stage 1: other lambdas, folds or training stories refit from the same features; the same
    # settings hit
    stage1_run(root, tmp_path / "a")
    n, kept = len(entries("stage1")), {k: len(entries(k)) for k in ("features", "responses",
                                                                    "audio")}
    stage1_run(root, tmp_path / "b")
    assert len(entries("stage1")) == n
    stage1_run(root, tmp_path / "c", "--alphas", "1,1e6,7")
    stage1_run(root, tmp_path / "d", "--cv-folds", "3")
    # features reused
    assert len(entries("stage1")) == n + 2 and {k: len(entries(k)) for k in kept} == kept
    stage1_run(root, tmp_path / "e", "--val-stories", "avatar")  # other training stories
    assert len(entries("stage1")) == n + 3
    # another backbone read: new features, the same data
    stage1_run(root, tmp_path / "f", "--layer", "2")
    assert len(entries("features")) > kept["features"]
    assert len(entries("responses")) == kept["responses"]
    assert len(entries("audio")) == kept["audio"]


def test_a_killed_write_is_never_trusted_and_a_broken_entry_is_rebuilt(demo, fresh, monkeypatch):
    real = np.save

    def killed(path, arr, *a, **k):  # half the file, then the process dies
        open(path, "wb").write(b"\x93NUMPY half")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        data.story_responses(demo, "UTS01", "souls")
    monkeypatch.setattr(np, "save", real)
    assert entries("responses") == [] and not os.listdir(os.path.join(fresh, "responses"))
    good = np.array(data.story_responses(demo, "UTS01", "souls")["data"])
    folder = os.path.join(fresh, "responses", entries("responses")[0])
    # a process killed by SIGKILL before its rename leaves only its temporary folder
    shutil.rmtree(folder)
    os.makedirs(folder + ".tmp999999")
    open(os.path.join(folder + ".tmp999999", "data.npy"), "wb").write(b"\x93NUMPY half")
    np.testing.assert_array_equal(data.story_responses(demo, "UTS01", "souls")["data"], good)
    assert not os.path.exists(folder + ".tmp999999")  # its writer is gone: removed
    entry = os.path.join(folder, "data.npy")
    with open(entry, "r+b") as f:
        f.truncate(os.path.getsize(entry) // 2)  # a disk that filled up, say
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = data.story_responses(demo, "UTS01", "souls")["data"]
    assert len(caught) == 1 and "broken cache entry" in str(caught[0].message)
    np.testing.assert_array_equal(again, good)


def write_subject(root, n_voxels, stories=12, rows=100, tr=0.5):
    """A subject with random float64 responses and noise audio: rows of tr seconds, no delay."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "stimuli"), exist_ok=True)
    os.makedirs(os.path.join(root, "derivative", "preprocessed_data", "UTS01"), exist_ok=True)
    from scipy.io import wavfile
    for i in range(stories):
        s = f"story{i:02d}"
        wavfile.write(data.wav_path(root, s), data.SR,
                      (rng.standard_normal(int(rows * tr * data.SR)) * 3000).astype(np.int16))
        with h5py.File(data.response_path(root, "UTS01", s), "w") as f:
            f["data"] = rng.standard_normal((rows, n_voxels), np.float32).astype(np.float64)
    return str(root)


def private_peak_mb(cmd, env):
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    peak = [0]

    def sample():
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    anon = [int(x.split()[1]) for x in f if x.startswith("RssAnon:")]
                    peak[0] = max([peak[0]] + anon)
            except OSError:
                pass
            time.sleep(0.02)
    t = threading.Thread(target=sample)
    t.start()
    out = p.communicate()[0]
    t.join()
    assert p.returncode == 0, out[-2000:]
    return peak[0] / 1024


def test_stage1_never_holds_the_response_matrix(tmp_path):
    """Stage 1 on 1,200 rows: 16,000 voxels, then 160,000 (a 768 MB float32 response matrix). The
    private memory may grow by the ridge's batch of voxels (about 256 MB), not by the matrix."""
    peaks = {}
    for v in (16000, 160000):
        root = write_subject(tmp_path / f"ds{v}", v)
        env = dict(os.environ, BRAINTUNE_CACHE=str(tmp_path / f"cache{v}"))
        peaks[v] = private_peak_mb([sys.executable, "train.py", "--data", root, "--model", "tiny",
                                    "--tiny-pretrain", "0",
                                    "--epochs", "0", "--history", "1", "--tr", "0.5",
                                    "--trim-start", "0",
                                    "--sound-start", "0", "--test-stories", "story11",
                                    "--val-stories", "story10",
                                    "--out", str(tmp_path / f"run{v}")], env)
    matrix = 1200 * 144000 * 4 / 2 ** 20  # MB the larger matrix adds, as float32
    assert peaks[160000] - peaks[16000] < 0.6 * matrix, peaks
