"""
How bench.py and bench_gpu.py measure (a median of repetitions, the peak memory a call adds, a
ridge problem of a given size), and the parts that run whole commands, each in a fresh process
with a fresh cache and its private memory sampled: the quick start (cold and warm), train.py on a
whole subject of the published size, and eval.py --downstream at Speech Commands' size.

    python bench.py --only quickstart      # the README's first command, cold and warm
    python bench.py --only fullscale       # a whole subject (about an hour, 45 GB of disk)
    python bench.py --only downstream      # Speech Commands v0.02's 105,829 clips
"""
import ctypes
import json
import os
import statistics
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.io import wavfile
from torchaudio.models import wavlm_model

import cache
import data
import downstream
from model import TINY, build_backbone, keep_freed_memory

ROOT = os.path.dirname(os.path.abspath(__file__))  # where train.py and synthetic.py are


def timeit(fn, reps=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _status(key):  # kB, from the kernel's accounting of this process
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])


def peak_mb(fn):
    """Peak memory that fn adds on the CPU, where bench.py's parts run (a GPU machine's too), in
    MB: the resident set's high-water mark (reset through /proc/self/clear_refs) above the
    resident set before fn (bench_gpu.peak_gb measures a GPU's)."""
    libc = ctypes.CDLL("libc.so.6")
    # while measuring, blocks over 1 MB are mapped and unmapped one by one (M_MMAP_THRESHOLD), so
    # the high-water mark counts live memory, not what glibc's heap keeps; it slows allocation, so
    # timings run with train.py's allocator settings instead
    libc.mallopt(-3, 1 << 20)
    # M_TRIM_THRESHOLD back to glibc's default: freed heap tops are returned
    libc.mallopt(-1, 128 << 10)
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    fn()
    peak = (_status("VmHWM:") - before) / 1024
    keep_freed_memory()
    return peak


@dataclass
class RidgeProblem:
    """A ridge of a given size with voxels of every signal-to-noise ratio."""
    X: torch.Tensor  # (n, p) features
    Y: torch.Tensor  # (n, v) responses
    alphas: np.ndarray  # (10,) the lambda grid
    groups: np.ndarray  # (n,) the fold of each row, 5 folds


def ridge_problem(n, p, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    Y = X @ (0.05 * torch.randn(p, v, generator=g)) + torch.randn(
        n, v, generator=g
    ) * torch.logspace(-1, 1.5, v)
    return RidgeProblem(X, Y, np.logspace(0, 5, 10), np.repeat(np.arange(5), -(-n // 5))[:n])


def run_measured(cmd, log, env=None, every=0.05):  # cmd runs in bench.py's folder
    """Run cmd in a fresh process, its output to `log`: wall seconds, peak private memory (RssAnon,
    sampled every `every` s: memory-mapped file pages the kernel can drop do not count), peak
    resident memory (max RSS, mapped pages included) and exit status."""
    t0, peak = time.time(), [0]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def sample():
        while p.returncode is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    anon = [int(x.split()[1]) for x in f if x.startswith("RssAnon:")]  # kB
                    peak[0] = max([peak[0]] + anon)
            except OSError:
                return
            time.sleep(every)
    threading.Thread(target=sample, daemon=True).start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.time() - t0, "private_gb": peak[0] / 2**20,
            "resident_gb": usage.ru_maxrss / 2**20, "exit": p.returncode}


def du_gb(path):
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
    return sum(sizes) / 2 ** 30


def bench_fullscale(quick):
    """train.py on a synthetic subject of the published size (UTS01: 85 stories of 650 s, 81,126
    voxels, float64 hf5, 10 test repeats, 44.1 kHz stereo wav), made once under the cache, each
    command in a fresh process with a fresh run cache: stage 1 cold, again warm with another ROI,
    one epoch of stage 2 on the whole cortex, and three subjects (S02 and S03 link to S01's files).
    """
    size = (dict(stories=3, seconds=60, voxels=3000) if quick
            else dict(stories=84, seconds=650, voxels=81126))
    home = os.path.join(cache.cache_root(), "fullscale-quick" if quick else "fullscale")
    ds, fresh, out = (os.path.join(home, k) for k in ("dataset", "cache", "runs"))
    py, env = sys.executable, dict(os.environ, BRAINTUNE_CACHE=fresh)
    res = {"dataset": {**size, "gb": None}}
    if not os.path.isdir(ds):
        os.makedirs(home, exist_ok=True)
        res["dataset"]["make"] = run_measured([py, "synthetic.py", ds, "--subjects", "1", "--sr",
                                              "44100", "--channels", "2",
                                              *(f"--{k}={v}" for k, v in size.items())],
                                              os.path.join(home, "make.log"))
    for s in ("UTS02", "UTS03"):
        link = os.path.join(ds, "derivative", "preprocessed_data", s)
        if not os.path.lexists(link):
            os.symlink("UTS01", link)
            shutil.copy(os.path.join(ds, "derivative", "rois", "UTS01.npz"),
                        os.path.join(ds, "derivative", "rois", s + ".npz"))
    res["dataset"]["gb"] = du_gb(ds)
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    common = [py, "train.py", "--data", ds, "--model", "tiny"]
    runs = {"stage1_cold": ["--subject", "S01", "--roi", "all", "--epochs", "0"],
            "stage1_warm_top1000": ["--subject", "S01", "--roi", "top1000", "--epochs", "0"],
            "stage2_one_epoch": ["--subject", "S01", "--roi", "all", "--epochs", "1"],
            "three_subjects": ["--subject", "S01,S02,S03", "--roi", "all", "--epochs", "0"]}
    for name, flags in runs.items():
        r = run_measured(common + flags + ["--out", os.path.join(out, name)],
                         os.path.join(home, name + ".log"), env)
        assert r["exit"] == 0, f"{name} failed: see {os.path.join(home, name + '.log')}"
        res[name] = dict(r, cache_gb=du_gb(fresh))
        print(f"fullscale {name}: {r['seconds']:.0f} s, private {r['private_gb']:.2f} GB",
              flush=True)
    return res


# Speech Commands v0.02's size: 35 words, testing_list 11,005 clips, validation_list 9,981
SPEECH_COMMANDS = dict(words=35, train=84843, valid=9981, test=11005)
WIDE = dict(encoder_embed_dim=768, encoder_num_heads=12, encoder_num_layers=1,
            encoder_ff_interm_features=3072)  # tiny's CNN under one layer as wide as a base model


def write_speechcommands(root, sizes, seed=0):
    """A Speech Commands folder of `sizes` (as SPEECH_COMMANDS) in the published layout, each word
    a tone of its own at a random level and phase in noise, 1 s of 16 kHz int16; written under a
    temporary name and renamed, so that a half-written folder is never used; one of other sizes
    is made again."""
    recorded = os.path.join(root, "sizes.json")
    if os.path.isfile(recorded) and cache.read_json(recorded) == dict(sizes, seed=seed):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng, t = np.random.default_rng(seed), np.arange(data.SR) / data.SR  # t (samples,)
    lists = {"valid": [], "test": []}
    with cache.atomic_folder(root) as tmp:
        for w in range(sizes["words"]):
            os.makedirs(os.path.join(tmp, f"word{w:02d}"))
        for split in ("train", "valid", "test"):
            for i in range(sizes[split]):
                w = i % sizes["words"]  # the words in turn
                rel = f"word{w:02d}/{split}{i:05x}_nohash_0.wav"
                phase, level = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5)
                wave = level * np.sin(2 * np.pi * (200 + 40 * w) * t + phase)
                wave += 0.05 * rng.standard_normal(data.SR)
                wavfile.write(os.path.join(tmp, rel), data.SR, (wave * 32767).astype(np.int16))
                if split != "train":
                    lists[split].append(rel)
        for split, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
            with open(os.path.join(tmp, name), "w") as f:
                f.writelines(r + "\n" for r in lists[split])
        with open(os.path.join(tmp, "sizes.json"), "w") as f:
            json.dump(dict(sizes, seed=seed), f)
    return root


def downstream_child(root, name, limit, out):
    """What bench_downstream measures, in a process of its own: downstream.evaluate (eval.py
    --downstream's work) of speechcommands in root, every layer of two random backbones `name`
    ("wide": WIDE), the first `limit` clips of each split (None: all), the probes trained 10 epochs
    (eval's 300 take longer and no more memory); its time and clips to the JSON `out`."""
    nets = {}
    for seed, k in enumerate(("pretrained", "tuned")):
        torch.manual_seed(seed)
        nets[k] = wavlm_model(**dict(TINY, **WIDE)) if name == "wide" else build_backbone(name)
    t = time.perf_counter()
    # "wide" is keyed as tiny: its weights' digest tells it apart
    result, _ = downstream.evaluate("speechcommands", root, nets, model_name=name.replace(
        "wide", "tiny"), normalize=False, limit=limit, epochs=10, every=10)
    seconds, clips = time.perf_counter() - t, sum(result["clips"].values())
    with open(out, "w") as f:
        json.dump(dict(model=name, clips=clips, splits=result["clips"], evaluate_seconds=seconds,
                       clips_per_s=2 * clips / seconds, layers=len(result["layers"])), f)


def bench_downstream(quick):
    """eval.py --downstream speechcommands's work (downstream_child), each run in a fresh process
    with a fresh cache, its private memory sampled: a base model (wavlm_base_plus's architecture) on
    100 clips a split, for the speed and the memory of its forwards; and every clip of a folder of
    Speech Commands v0.02's size (105,829 clips, made once under the cache) with a backbone as wide
    as a base model but light (WIDE), so that the memory of what grows with the clips (the listing,
    the memory maps, the cache, the probes on (84,843, 768) features, the bootstrap) is measured at
    full size."""
    sizes = dict(words=5, train=40, valid=10, test=10) if quick else SPEECH_COMMANDS
    home = os.path.join(cache.cache_root(), "downstream-bench" + ("-quick" if quick else ""))
    root = write_speechcommands(os.path.join(home, "speechcommands"), sizes)
    res = {"folder": sizes}
    for key, name, limit in (("base", "tiny" if quick else "wavlm_base_plus", 4 if quick else 100),
                             ("full_size", "wide", None)):
        fresh, out = os.path.join(home, "cache"), os.path.join(home, key + ".json")
        shutil.rmtree(fresh, ignore_errors=True)
        code = (f"import bench_runs; bench_runs.downstream_child({root!r}, {name!r}, {limit!r}, "
                f"{out!r})")
        r = run_measured([sys.executable, "-c", code], os.path.join(home, key + ".log"),
                         dict(os.environ, BRAINTUNE_CACHE=fresh))
        assert r["exit"] == 0, f"downstream {key} failed: see {os.path.join(home, key + '.log')}"
        res[key] = dict(r, **cache.read_json(out))
        shutil.rmtree(fresh, ignore_errors=True)
    return res


def bench_quickstart(quick):
    """The README's first command, `python train.py --subject S01 --roi all`, as a new user runs
    it: in a fresh process with an empty cache (the synthetic dataset made, tiny pretrained,
    stage 1, stage 2, the refit), then again with the cache full (stage 1 read back), each in a
    new run folder; its wall time, private memory and the results table it printed."""
    home = os.path.join(cache.cache_root(), "quickstart-bench")
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, BRAINTUNE_CACHE=os.path.join(home, "cache"))
    flags = ["--subject", "S01", "--roi", "all"] + (["--epochs", "1"] if quick else [])
    res = {"command": "python train.py " + " ".join(flags)}
    for key in ("cold", "warm"):
        log = os.path.join(home, key + ".log")
        os.makedirs(home, exist_ok=True)
        r = run_measured([sys.executable, "train.py", *flags, "--out",
                          os.path.join(home, key)], log, env)
        assert r["exit"] == 0, f"the quick start ({key}) failed: see {log}"
        table = open(log).read().split("protocol ")[-1]
        res[key] = dict(r, table="protocol " + table.strip())
    return res
