"""
The data: spoken stories, their audio, and the fMRI responses of the people who heard them.

Reads the real dataset (LeBel et al. 2023, OpenNeuro ds003020) and writes a synthetic one in the
same layout with a known ground truth:
    derivative/preprocessed_data/<SUBJ>/<story>.hf5   key "data": (TRs, voxels) float64
    stimuli/<story>.wav
    derivative/TextGrids/<story>.TextGrid             tier 0 phones, tier 1 words
    derivative/rois/<SUBJ>.npz                        one key per ROI: hf5 column indices or a mask
Each fMRI frame (TR) becomes one example: the H TRs of audio heard before it, and its response.
A whole subject is ~20 GB of float64 and ~10 GB of 44.1 kHz audio, so each file is read once into
a cache of float32 .npy files ($BRAINTUNE_CACHE, default .cache) that runs memory-map.

    python data.py demo OUT [--subjects 3 --stories 10 --voxels 500 --seed 0]
    python data.py fetch ds003020 --subject UTS01      # the real dataset, what braintune reads of it
"""
import argparse
import concurrent.futures
import contextlib
import glob
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.functional as AF
from scipy.io import wavfile
from scipy.signal import resample_poly
from scipy.stats import gamma
from tqdm import tqdm

SR = 16000  # every torchaudio speech model takes 16 kHz audio
TR = 2.0045  # seconds, from the scanner's trigger files
TRIM_START = 10  # TRs the hf5 files drop at the start of each run
SOUND_START = 10.0  # seconds from the start of the run to the start of the audio
TEST_STORY = "wheretheressmoke"
TRAIN_STORIES = ("alternateithicatom souls avatar legacy odetostepfather undertheinfluence howtodraw "
                 "myfirstdaywiththeyankees naked life stagefright tildeath fromboyhoodtofatherhood sloth "
                 "exorcism haveyoumethimyet adollshouse inamoment theclosetthatateeverything "
                 "adventuresinsayingyes buck swimmingwithastronauts thatthingonmyarm eyespy itsabox "
                 "hangtime").split()


def row_times(n_rows, tr=TR, trim_start=TRIM_START, sound_start=SOUND_START):
    """Seconds from audio onset at the centre of each hf5 row: row r is scanner TR r + trim_start,
    and scanner TR i is centred at i * tr - sound_start + tr / 2."""
    return (np.arange(n_rows) + trim_start) * tr - sound_start + tr / 2


def progress(items, desc, total=None, note=None, every=30.0):
    """tqdm on a terminal; elsewhere a plain line every `every` seconds (quick steps print nothing).
    note() -> str: shown after each item (a running loss, say)."""
    if int(os.environ.get("RANK", 0)):
        yield from items
        return
    bar = tqdm(items, desc=desc, total=total, leave=False) if sys.stderr.isatty() else None
    total, t0 = total or len(items), time.time()
    last = t0
    for i, x in enumerate(bar if bar is not None else items, 1):
        yield x
        if bar is not None:
            if note:
                bar.set_postfix_str(note(), refresh=False)
        elif time.time() - last > every or (i == total and last > t0):
            last = time.time()
            print(f"{desc}: {i}/{total}, {last - t0:.0f} s" + (f", {note()}" if note else ""), file=sys.stderr,
                  flush=True)


# -----------------------------------------------------------------------------
# the cache: every file read once, kept as float32 .npy files that runs memory-map

_PRIVATE = []  # the folder of an active no_cache()


def cache_root():
    return _PRIVATE[-1] if _PRIVATE else os.path.abspath(os.environ.get("BRAINTUNE_CACHE", ".cache"))


@contextlib.contextmanager
def no_cache():
    """--no-cache: within it, entries go to a private folder, deleted at its end; nothing is reused."""
    os.makedirs(cache_root(), exist_ok=True)
    _PRIVATE.append(tempfile.mkdtemp(prefix="nocache-", dir=cache_root()))
    try:
        yield
    finally:
        shutil.rmtree(_PRIVATE.pop(), ignore_errors=True)


def file_key(path):
    """What identifies a source file: where it really is (datalad's links resolved), size, time."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def digest(obj):
    """A hex digest of nested dicts, lists, arrays, tensors and JSON values (a cache key)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            x = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
        if isinstance(x, np.ndarray):
            h.update(f"array{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).data)
        elif isinstance(x, dict):
            for k in sorted(x):
                feed(str(k)), feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x).encode() + b";")
    feed(obj)
    return h.hexdigest()[:24]


def cached(kind, key, build, name="entry"):
    """The cache entry of `key`: build() -> {name: numpy array (saved as .npy, read back memory-mapped),
    dict of tensors (.pt) or JSON value}, made once in <cache>/<kind>/<name>-<digest>. It is written
    under a temporary name and renamed, and read back only if every file has the size its manifest
    says: a run killed while writing leaves nothing that a later run would trust. build None: only
    look (None if there is no entry)."""
    path = os.path.join(cache_root(), kind, f"{name}-{digest(key)}")
    if os.path.isdir(path):
        try:
            return _read_entry(path)
        except Exception as e:  # truncated, corrupt, or from an older layout
            warnings.warn(f"{path}: broken cache entry ({type(e).__name__}: {e}); rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
    if build is None:
        return None
    for old in glob.glob(path + ".tmp*") if os.name == "posix" else []:  # left by a killed process: never read
        try:
            os.kill(int(old.rsplit(".tmp", 1)[1]), 0)  # signal 0: is the writer still running?
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError):
            pass
    out, tmp = build(), f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = {"key": key, "files": {}, "values": {}}
        for k, v in out.items():
            if isinstance(v, np.ndarray):
                np.save(os.path.join(tmp, k + ".npy"), v)
            elif isinstance(v, dict):
                torch.save(v, os.path.join(tmp, k + ".pt"))
            else:
                manifest["values"][k] = v
                continue
            f = k + (".npy" if isinstance(v, np.ndarray) else ".pt")
            manifest["files"][f] = os.path.getsize(os.path.join(tmp, f))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, default=lambda x: f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # else another process made the same entry first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_entry(path)


def _read_entry(path):
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    out = dict(manifest["values"])
    for f, size in manifest["files"].items():
        p = os.path.join(path, f)
        if os.path.getsize(p) != size:
            raise ValueError(f"{f} has {os.path.getsize(p)} bytes, not {size}")
        out[f.rsplit(".", 1)[0]] = np.load(p, mmap_mode="c") if f.endswith(".npy") else \
            torch.load(p, map_location="cpu", weights_only=True)
    return out


# -----------------------------------------------------------------------------
# the reader

def subjects(root):
    d = os.path.join(root, "derivative", "preprocessed_data")
    if not os.path.isdir(d):
        raise ValueError(f"{d}: no such folder; is {root} a ds003020-style dataset?")
    return sorted(s for s in os.listdir(d) if os.path.isdir(os.path.join(d, s)))


def find_subject(root, subject):
    """'S01' also finds 'UTS01', the real dataset's name."""
    present = subjects(root)
    for name in (subject, "UT" + subject):
        if name in present:
            return name
    raise ValueError(f"unknown subject {subject!r} in {root}; present: {', '.join(present) or 'none'}")


def response_path(root, subj, story):
    return os.path.join(root, "derivative", "preprocessed_data", subj, story + ".hf5")


def wav_path(root, story):
    return os.path.join(root, "stimuli", story + ".wav")


def read_wav(path):
    """Any WAV (int16, int32, uint8, float; mono or multi-channel) -> (samples,) float32 at 16 kHz."""
    try:
        sr, x = wavfile.read(path, mmap=True)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read as WAV ({e})") from None
    scale = {np.dtype(np.int16): 2 ** 15, np.dtype(np.int32): 2 ** 31, np.dtype(np.uint8): 128}.get(x.dtype, 1)
    mono = x.mean(1, dtype=np.float32) if x.ndim == 2 else x.astype(np.float32)  # (samples,)
    mono = torch.from_numpy((mono - (128 if x.dtype == np.uint8 else 0)) / scale)
    return AF.resample(mono, sr, SR) if sr != SR else mono


def open_hf5(path):
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot read as HDF5 ({e})") from None


def read_hf5(path, key="data"):
    with open_hf5(path) as f:
        if key not in f:
            raise ValueError(f"{path}: no {key!r} dataset (keys: {', '.join(f.keys())})")
        return np.asarray(f[key], dtype=np.float32)


def zscore(x, axis=0):
    x = x - x.mean(axis, keepdims=True)
    return x / np.where(x.std(axis, keepdims=True) > 0, x.std(axis, keepdims=True), 1)


def zscore_(x):
    """zscore of each column of x (rows, cols) in place, with float64 sums and no copy of x (a story
    of a whole subject is 100-200 MB); constant columns become 0. Returns the standard deviations."""
    x -= x.mean(0, dtype=np.float64).astype(x.dtype)
    sd = np.sqrt(np.einsum("ij,ij->j", x, x, dtype=np.float64) / max(len(x), 1)).astype(x.dtype)
    x /= np.where(sd > 0, sd, 1)
    return sd


def splits(root, subj, test_stories=None, val_stories=None):
    """(train, val, test) story lists for a subject. Every story with responses must have audio.
    Audio with no responses is a story this subject did not hear (UTS04-08 heard 27 of 84)."""
    resp = sorted(f[:-4] for f in os.listdir(os.path.join(root, "derivative", "preprocessed_data", subj))
                  if f.endswith(".hf5"))
    stim = os.path.join(root, "stimuli")
    audio = {f[:-4] for f in os.listdir(stim) if f.endswith(".wav")} if os.path.isdir(stim) else set()
    for s in resp:
        if s not in audio:
            raise ValueError(f"story {s!r} has responses for {subj} but no audio {wav_path(root, s)}")
    test = test_stories or ([TEST_STORY] if TEST_STORY in resp else resp[-1:])
    rest = [s for s in resp if s not in test]
    val = val_stories or (["stagefright"] if "stagefright" in rest else rest[-1:])
    if set(val) & set(test) or len(set(val)) < len(val) or len(set(test)) < len(test):
        raise ValueError(f"--val-stories {','.join(val)} and --test-stories {','.join(test)}: a story may be in one "
                         "of them once, never in both (early stopping on a test story inflates every test r)")
    for s in test + val:
        if s not in resp:
            raise ValueError(f"story {s!r} has no responses for {subj}{'' if s in audio else ' and no audio'}; "
                             f"its stories are: {', '.join(resp)}")
    train = [s for s in rest if s not in val]
    if not train:
        raise ValueError(f"{subj} has no training stories left after test {test} and validation {val}")
    return train, val, test


def placeholder(path):
    """A file that datalad (git-annex) has listed but not fetched: a broken link, or a small pointer file."""
    if os.path.islink(path) and not os.path.exists(path):
        return True
    if os.path.isfile(path) and os.path.getsize(path) < 1024:
        with open(path, "rb") as f:
            return b"annex/objects/" in f.read()
    return False


def check(root, subjects, test_stories=None, val_stories=None, folds=None, **timing):
    """What can be known before reading any data, from listings and file headers alone: each subject
    and its splits, every file there and fetched, audio long enough for its rows, no more folds than
    training stories. Raises ValueError naming the flag or the file. Returns {subject: (voxels,
    (train, val, test))}."""
    out, timing = {}, dict(dict(tr=TR, trim_start=TRIM_START, sound_start=SOUND_START), **timing)
    for name in subjects:
        subj = find_subject(root, name)
        train, val, test = splits(root, subj, test_stories, val_stories)
        test_stories, val_stories = test, val
        if folds is not None and folds > len(train):
            raise ValueError(f"--cv-folds {folds}: {subj} has {len(train)} training stories, and a fold is whole stories")
        for s in train + val + test:
            for path in (response_path(root, subj, s), wav_path(root, s)):
                if placeholder(path):
                    raise ValueError(f"{path}: not fetched yet (a datalad placeholder); run `datalad get "
                                     f"{os.path.relpath(path, root)}` in {root}")
            with open_hf5(response_path(root, subj, s)) as f:
                shape = f["data"].shape if "data" in f else ()
            if len(shape) != 2 or (subj in out and shape[1] != out[subj][0]):
                raise ValueError(f"{response_path(root, subj, s)}: 'data' has shape {shape}; expected (TRs, "
                                 f"{out[subj][0] if subj in out else 'voxels'})")
            try:
                sr, wave = wavfile.read(wav_path(root, s), mmap=True)
            except (ValueError, OSError) as e:
                raise ValueError(f"{wav_path(root, s)}: cannot read as WAV ({e})") from None
            need = row_times(shape[0], **timing)[-1] if shape[0] else 0
            if need - len(wave) / sr > timing["tr"]:
                raise ValueError(f"story {s!r}: audio is {len(wave) / sr:.1f} s long but its last fMRI frame needs "
                                 f"audio up to {need:.1f} s (see --tr, --trim-start, --sound-start)")
            out[subj] = (shape[1], (train, val, test))
    return out


def story_responses(root, subj, story):
    """{"data": (TRs, voxels) float32 z-scored, memory-mapped; "good": (voxels,) finite and not
    constant in this story}. Read once from the hf5 (converted to float32 while reading, so no
    float64 copy), then from the cache. Voxels not good are zero."""
    path = response_path(root, subj, story)

    def build():
        with open_hf5(path) as f:
            if "data" not in f or f["data"].ndim != 2:
                raise ValueError(f"{path}: no (TRs, voxels) 'data' dataset (keys: {', '.join(f.keys())})")
            x = np.empty(f["data"].shape, np.float32)
            f["data"].read_direct(x)
        good = np.isfinite(x).all(0)
        np.nan_to_num(x, copy=False)
        good &= zscore_(x) > 0
        x[:, ~good] = 0
        return {"data": x, "good": good}
    return cached("responses", dict(file=file_key(path), v=1), build, story)


def load_responses(root, subj, stories):
    """{story: (TRs, voxels) z-scored per story, memory-mapped}, and the mask of usable voxels
    (finite and not constant in every story); the others are left out of fitting and every mean."""
    resp, good = {}, None
    for s in progress(stories, f"{subj} responses"):
        e = story_responses(root, subj, s)
        if good is not None and len(e["good"]) != len(good):
            raise ValueError(f"{os.path.dirname(response_path(root, subj, s))}: stories have different voxel "
                             f"counts ({len(good)}, and {len(e['good'])} in {s})")
        resp[s], good = e["data"], e["good"] if good is None else good & e["good"]
    if not good.all():
        warnings.warn(f"{subj}: {(~good).sum()} of {good.size} voxels are constant or NaN in some story; "
                      f"they are left out of fitting and of every mean")
    return resp, good


class Responses:
    """A split's responses as one (rows, voxels) matrix that is never in memory whole: Y[rows, cols]
    reads those rows and columns from each story's memory-mapped file, as a float32 tensor.
    Voxels outside `good` read as 0."""

    def __init__(self, parts, good, keys=None):
        self.parts, self.good, self.keys = parts, np.asarray(good), keys  # keys: the stories' files, for caches
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), len(self.good))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        cols = np.arange(self.shape[1])[np.asarray(cols) if isinstance(cols, torch.Tensor) else cols]
        if len(cols) and cols[-1] - cols[0] + 1 == len(cols):
            take = slice(cols[0], cols[-1] + 1)  # a block of columns is one copy per row
        else:
            take = cols
        if isinstance(rows, slice) and rows == slice(None):
            out = np.concatenate([p[:, take] for p in self.parts] or [np.zeros((0, len(cols)), np.float32)])
        else:
            rows = np.arange(len(self))[np.asarray(rows)]
            part = np.searchsorted(self.starts, rows, "right") - 1
            out = np.stack([self.parts[s][r - self.starts[s], take] for s, r in zip(part, rows)]) \
                if len(rows) else np.zeros((0, len(cols)), np.float32)
        out = np.array(out, np.float32, copy=None)
        out *= self.good[cols]
        return torch.from_numpy(out)


def noise_ceiling(repeats):
    """cc_max per voxel from (repeats, TRs, voxels) (Schoppe et al. 2016); NaN where SP <= 0."""
    N = repeats.shape[0]
    var_sum = repeats.sum(0).var(0)  # (voxels,)
    sum_var = repeats.var(1).sum(0)
    SP = (var_sum - sum_var) / (N * (N - 1))
    TP = repeats.var(1).mean(0)
    cc = 1 / np.sqrt(1 + (1 / N) * (TP / np.where(SP > 0, SP, np.nan) - 1))
    return np.where(SP > 0, cc, np.nan)


def story_ceiling(root, subj, story, block=4096):
    """The noise ceiling of every voxel from the story's "individual_repeats" (repeats, TRs, voxels),
    read in blocks of voxels; None if the file has no repeats."""
    path = response_path(root, subj, story)
    with open_hf5(path) as f:
        if "individual_repeats" not in f:
            return None

    def build():
        with open_hf5(path) as f:
            reps = f["individual_repeats"]
            cc = np.empty(reps.shape[2], np.float32)
            for j in progress(range(0, len(cc), block), f"{subj} noise ceiling"):
                cc[j:j + block] = noise_ceiling(reps[:, :, j:j + block])
        return {"ceiling": cc}
    return cached("ceiling", dict(file=file_key(path), v=1), build, story)["ceiling"]


def load_audio(root, stories):
    """{story: (samples,) float32 at 16 kHz, memory-mapped}: each wav read and resampled once."""
    def one(s):
        build = lambda: {"wave": read_wav(wav_path(root, s)).numpy()}
        key = dict(file=file_key(wav_path(root, s)), sr=SR, torchaudio=torchaudio.__version__)
        return cached("audio", key, build, s)["wave"]
    return {s: one(s) for s in progress(stories, "audio")}


def _as_indices(arr, n_voxels, what):
    arr = np.asarray(arr)
    if arr.dtype == bool:
        if arr.shape != (n_voxels,):
            raise ValueError(f"{what}: mask has shape {arr.shape}, the responses have {n_voxels} voxels")
        arr = np.flatnonzero(arr)
    if arr.size == 0 or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected a non-empty 1-D array of voxel indices or a boolean mask")
    if arr.min() < 0 or arr.max() >= n_voxels:
        raise ValueError(f"{what}: indices outside 0..{n_voxels - 1}")
    return np.unique(arr)


def roi_sets(root, subj, n_voxels):
    """{name: hf5 column indices} for every ROI in derivative/rois/<SUBJ>.npz (none if absent)."""
    path = os.path.join(root, "derivative", "rois", subj + ".npz")
    if not os.path.exists(path):
        return {}
    with np.load(path) as f:
        return {k: _as_indices(f[k], n_voxels, f"{path}[{k}]") for k in f.files}


def load_roi(root, subj, roi, n_voxels):
    """`all`, an ROI name from the subject's ROI file, or a .npy file of indices or a mask."""
    if roi == "all":
        return np.arange(n_voxels)
    if roi.endswith(".npy"):
        if not os.path.exists(roi):
            raise ValueError(f"{roi}: no such ROI file")
        return _as_indices(np.load(roi), n_voxels, roi)
    rois = roi_sets(root, subj, n_voxels)
    if roi not in rois:
        raise ValueError(f"unknown ROI {roi!r} for {subj}; available: all, topN, a .npy path"
                         f"{', ' + ', '.join(rois) if rois else ''}")
    return rois[roi]


def read_textgrid(path):
    """Praat TextGrid, long or short text format -> {tier name: [(start, end, label)]}, in file order.
    Both formats hold the same values in the same order; the long one adds `key =` labels and
    `[i]` indices, which the tokenizer skips. Point tiers give (time, time, mark)."""
    try:
        text = open(path, encoding="utf-8-sig").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    tokens = [s.replace('""', '"') if n == "" else float(n) for s, n in
              re.findall(r'"((?:[^"]|"")*)"|(?<![\[\w.])(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![\]\w])', text)]
    bad = ValueError(f"{path}: not a TextGrid in Praat's long or short text format")
    if tokens[:2] != ["ooTextFile", "TextGrid"]:
        raise bad
    try:
        pos, tiers = 5, {}
        for _ in range(int(tokens[4])):
            kind, name, n = tokens[pos], tokens[pos + 1], int(tokens[pos + 4])
            pos += 5
            step = 3 if kind == "IntervalTier" else 2
            items = [tokens[i:i + step] for i in range(pos, pos + step * n, step)]
            tiers[name] = [(a, b, lab) for a, b, lab in items] if step == 3 else [(t, t, m) for t, m in items]
            pos += step * n
    except (IndexError, TypeError, ValueError):
        raise bad from None
    return tiers


def textgrid_path(root, story):
    return os.path.join(root, "derivative", "TextGrids", story + ".TextGrid")


PHONEMES = set("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W "
               "Y Z ZH".split())  # ARPAbet's 39


def words_and_phones(path, skip=("sentence_start", "sentence_end", "br", "lg", "ls", "ns", "sp", "")):
    """(phones, words) of a ds003020 TextGrid (tier 0 phones, tier 1 words), read as the Huth lab's
    dsutils does: labels lower-cased and stripped of braces ({BR}, {NS}, ...) before the pauses and
    noises in `skip` are dropped; phones stripped of their stress digits (AH0 -> AH), keeping
    ARPAbet's 39 phonemes and nothing else."""
    phones, words = list(read_textgrid(path).values())[:2]
    words = [(a, b, lab) for a, b, lab in words if lab.strip().lower().strip("{}") not in skip]
    phones = [(a, b, re.sub(r"\d", "", lab.strip().upper())) for a, b, lab in phones]
    return [p for p in phones if p[2] in PHONEMES], words


# -----------------------------------------------------------------------------
# delayed-TR windows

class Windows(torch.utils.data.Dataset):
    """For row r of each story, the audio heard from t_r - H*TR to t_r, sliced on the fly from the
    story's (memory-mapped) 16 kHz wave. rows: {story: number of fMRI frames, or its responses};
    keys: {story: what identifies its audio} for the feature cache. Yields (wave (samples,), story
    index, row index)."""

    def __init__(self, waves, rows, stories, history=6, tr=TR, trim_start=TRIM_START, sound_start=SOUND_START,
                 keys=None):
        self.stories, self.n_samples = list(stories), round(history * tr * SR)
        self.waves = [waves[s] for s in self.stories]
        self.keys = [keys[s] for s in self.stories] if keys else None
        self.timing = dict(history=history, tr=tr, trim_start=trim_start, sound_start=sound_start)
        self.ends = []  # (rows,) sample at which each window ends
        for s, wave in zip(self.stories, self.waves):
            n = rows[s] if isinstance(rows[s], (int, np.integer)) else len(rows[s])
            ends = np.round(row_times(n, tr, trim_start, sound_start) * SR).astype(np.int64)
            if n and ends[-1] - len(wave) > tr * SR:
                raise ValueError(f"story {s!r}: audio is {len(wave) / SR:.1f} s long but its last fMRI "
                                 f"frame needs audio up to {ends[-1] / SR:.1f} s")
            self.ends.append(ends)
        self.starts = np.cumsum([0] + [len(e) for e in self.ends])  # first window of each story
        self.index = [(i, r) for i, e in enumerate(self.ends) for r in range(len(e))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        s, r = self.index[i]
        wave, end = self.waves[s], int(self.ends[s][r])
        start = end - self.n_samples
        w = torch.from_numpy(np.array(wave[max(start, 0):max(min(end, len(wave)), 0)], np.float32))
        # zeros before the story starts; a short tail (under one TR) is silence too
        return F.pad(w, (max(-start, 0), self.n_samples - max(-start, 0) - len(w))), s, r


def pool_frames(frames, history):
    """(batch, n_frames, dim) -> (batch, history, dim): the mean of the frames in each TR-long bin.
    The window runs forward in time and ends at t_r, so its last bin is the audio heard 0..1 TR
    before t_r; we flip, so that out[:, k] is the audio heard k..k+1 TRs before t_r (delay k)."""
    B, n, D = frames.shape
    assert n >= history, f"{n} frames cannot fill {history} bins"
    edges = torch.linspace(0, n, history + 1, device=frames.device).round().long()
    c = F.pad(frames.cumsum(1), (0, 0, 1, 0))  # (batch, n_frames + 1, dim)
    sums = c[:, edges[1:]] - c[:, edges[:-1]]  # (batch, history, dim)
    return (sums / (edges[1:] - edges[:-1]).to(frames.dtype)[None, :, None]).flip(1)


@torch.inference_mode()
def features(fn, windows, key, batch_size, device, desc="features"):
    """fn(wave (batch, samples)) -> (batch, p) for every window, in order: (rows, p) float32 on the
    CPU. With a key (what fn computes: backbone, layer, ...), each story's block is cached under it
    and the story's audio, row count and timing, so a second run does not forward it again. With a
    list of keys, fn returns a list of (batch, p), one per key (several layers of one forward): each
    story's blocks are cached and nothing is returned, so that no caller holds every layer at once."""
    precision, many = "bf16" if device.type == "cuda" else "fp32", isinstance(key, list)

    def blocks(i):  # [(rows, p)] of story i, one per key
        out = []
        for wave, *_ in torch.utils.data.DataLoader(
                torch.utils.data.Subset(windows, range(windows.starts[i], windows.starts[i + 1])), batch_size):
            with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                y = fn(wave.to(device))
            out.append([t.float().cpu() for t in (y if many else [y])])
        return [torch.cat(c).numpy() for c in zip(*out)] if out else [np.zeros((0, 0), np.float32)]
    out = []
    for i in progress(range(len(windows.stories)), desc):
        if key is None or windows.keys is None:
            out.append(torch.from_numpy(blocks(i)[0]))
            continue
        keys = [dict(k, audio=windows.keys[i], rows=len(windows.ends[i]), precision=precision, **windows.timing)
                for k in (key if many else [key])]
        got = [cached("features", k, None, windows.stories[i]) for k in keys]
        if any(g is None for g in got):  # one forward for every missing key
            got = [cached("features", k, lambda x=x: {"x": x}, windows.stories[i]) for k, x in zip(keys, blocks(i))]
        if not many:
            out.append(torch.from_numpy(np.array(got[0]["x"])))
    return None if many else torch.cat(out)


# -----------------------------------------------------------------------------
# the papers' evaluation features: a sliding context, Lanczos to the TRs, FIR delays

PROTOCOLS = {  # what stage 1's baseline, the refit and eval's fits see; the training input stays the windows
    "windows": dict(delays=(), test_skip=0),
    "moussa2025": dict(context=16.0, stride=0.1, delays=(1, 2, 3, 4), test_skip=40),
    "brainwavlm": dict(context=3.75, stride=0.25, delays=(1, 2, 3, 4), test_skip=40),
}


def lanczos(x, old_times, new_times, tr, window=3):
    """x (old samples, p) at old_times resampled to new_times (s) by the Huth lab's Lanczos filter:
    weight sinc(t) sinc(t / window) for |t| <= window, t = (new time - old time) / tr, so the cutoff
    is the new rate's Nyquist frequency; two-sided, not normalised (z-scoring follows). (new, p)."""
    t = (np.asarray(new_times, np.float64)[:, None] - np.asarray(old_times, np.float64)[None, :]) / tr
    return torch.as_tensor(np.sinc(t) * np.sinc(t / window) * (np.abs(t) <= window), dtype=x.dtype) @ x


def delayed(x, delays):
    """(rows, p) -> (rows, len(delays) * p): row t holds rows t - d of x for each delay d, zeros before
    the story starts (the finite-impulse-response model)."""
    return torch.cat([F.pad(x, (0, 0, d, 0))[:len(x)] for d in delays], 1)


@torch.inference_mode()
def stride_frames(frames_fn, wave, hop, context, stride, batch_size, device):
    """Frame features of a whole story, each frame heard with `context` s of audio before its stride:
    the story cut into chunks of context + stride seconds ending every `stride` s, each forwarded once
    (in batches; zeros before the story starts and after it ends), the frames of its last stride kept.
    frames_fn: (batch, samples) -> (batch, frames, dim); hop: samples per frame.
    Returns the frames' times (s) and features (frames, dim)."""
    n_ctx, n_str = round(context * SR), round(stride * SR)
    chunk, ends = n_ctx + n_str, np.arange(n_str, len(wave) + n_str, n_str)  # chunk ends, in samples
    times, feats = [], []
    for i in range(0, len(ends), batch_size):
        waves = [np.array(wave[max(e - chunk, 0):min(e, len(wave))], np.float32) for e in ends[i:i + batch_size]]
        waves = [np.pad(w, (max(chunk - e, 0), chunk - max(chunk - e, 0) - len(w))) for w, e in zip(waves, ends[i:])]
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            h = frames_fn(torch.from_numpy(np.stack(waves)).to(device)).float().cpu()  # (batch, frames, dim)
        at = (np.arange(h.shape[1]) + 0.5) * hop  # each frame's centre, samples into the chunk
        keep = np.flatnonzero((at > chunk - n_str) & (at <= chunk))  # the chunk's last stride
        times.append((ends[i:i + len(waves), None] - chunk + at[keep]) / SR)
        feats.append(h[:, keep].reshape(-1, h.shape[2]))
    return np.concatenate(times).ravel(), torch.cat(feats)


def protocol_features(frames_fn, hop, windows, key, protocol, batch_size, device, desc="features"):
    """Each story's features under a paper's protocol (PROTOCOLS: context, stride, delays), at its
    fMRI rows: stride_frames, Lanczos to the rows' times, z-scored per story, delayed. (rows, p),
    the resampled frames cached per story under key and the protocol."""
    out = []
    for i in progress(range(len(windows.stories)), desc):
        t_rows = row_times(len(windows.ends[i]), windows.timing["tr"], windows.timing["trim_start"],
                           windows.timing["sound_start"])

        def build():
            times, x = stride_frames(frames_fn, windows.waves[i], hop, protocol["context"], protocol["stride"],
                                     batch_size, device)
            return {"x": lanczos(x, times, t_rows, windows.timing["tr"]).numpy()}
        k = dict(key, audio=windows.keys[i], rows=len(t_rows), context=protocol["context"], stride=protocol["stride"],
                 lanczos=3, **windows.timing) if key is not None and windows.keys else None
        x = torch.from_numpy(np.array((cached("protocol", k, build, windows.stories[i]) if k else build())["x"]))
        out.append(delayed((x - x.mean(0)) / x.std(0).clamp_min(1e-6), protocol["delays"]))
    return torch.cat(out)


def prepare(root, subjects, test_stories=None, val_stories=None, **window_kw):
    """Each subject's splits, responses, usable voxels, ROIs and noise ceiling, and the windows the
    subjects share: one per (story, row), however many subjects heard it, so each is forwarded once.
    Every subject is held out on the first subject's test and validation stories.
    Returns (ds, shared): ds[k]["Y<split>"] the subject's Responses (rows, voxels);
    ds[k]["take_<split>"] (rows,) the shared window of each of its rows; ds[k]["row_<split>"]
    (shared windows,) its row of each shared window, -1 where it did not hear it; shared[split] a
    Windows of the audio alone."""
    ds, waves, keys = [], {}, {}
    for name in subjects:
        subj = find_subject(root, name)
        if any(d["subject"] == subj for d in ds):
            raise ValueError(f"subject {subj} is given twice")
        train, val, test = splits(root, subj, test_stories, val_stories)
        test_stories, val_stories = test, val  # the same held-out stories for every subject
        resp, good = load_responses(root, subj, train + val + test)
        waves.update(load_audio(root, [s for s in resp if s not in waves]))  # each story read once
        keys.update({s: file_key(wav_path(root, s)) for s in resp})
        d = dict(subject=subj, stories=dict(train=train, val=val, test=test), good=good,
                 rois=roi_sets(root, subj, len(good)),
                 ceiling=story_ceiling(root, subj, test[0]) if len(test) == 1 else None)
        for split, stories in d["stories"].items():
            d[split] = Windows(waves, resp, stories, keys=keys, **window_kw)
            d["Y" + split] = Responses([resp[s] for s in stories], good,
                                       [file_key(response_path(root, subj, s)) for s in stories])
        ds.append(d)
    shared = {}
    for split in ("train", "val", "test"):
        rows = {}  # story -> rows, in first-heard order
        for d in ds:
            for s, ends in zip(d[split].stories, d[split].ends):
                rows[s] = max(rows.get(s, 0), len(ends))
        # row r of a story is the same audio for every subject: targets are looked up through take_<split>
        shared[split] = Windows(waves, rows, list(rows), keys=keys, **window_kw)
        start = dict(zip(rows, np.cumsum([0] + list(rows.values()))))
        for d in ds:
            take = np.concatenate([start[s] + np.arange(len(e)) for s, e in zip(d[split].stories, d[split].ends)])
            d["take_" + split] = torch.as_tensor(take)
            d["row_" + split] = torch.full((len(shared[split]),), -1, dtype=torch.long)
            d["row_" + split][take] = torch.arange(len(take))
    return ds, shared


# -----------------------------------------------------------------------------
# fetching the real dataset, pinned to OpenNeuro's version 2.2.0

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds003020-v2.2.0-manifest.json")
OPENNEURO = "https://s3.amazonaws.com/openneuro.org/ds003020"  # every address in the manifest starts so
REAL_SUBJECTS = [f"UTS0{i}" for i in range(1, 9)]


def fetch_list(manifest, subjects, pycortex=False):
    """The manifest's paths that braintune reads for these subjects: their responses, the audio and
    TextGrids of the stories they heard, the English1000 word vectors, and (pycortex) their pycortex
    database. Nothing else."""
    wanted = {"derivative/english1000sm.hf5"}
    for s in subjects:
        stories = [p.rsplit("/", 1)[1][:-4] for p in manifest if p.startswith(f"derivative/preprocessed_data/{s}/")]
        wanted |= {f"derivative/preprocessed_data/{s}/{t}.hf5" for t in stories}
        wanted |= {f"stimuli/{t}.wav" for t in stories} | {f"derivative/TextGrids/{t}.TextGrid" for t in stories}
        wanted |= {p for p in manifest if pycortex and p.startswith(f"derivative/pycortex-db/{s}/")}
    return sorted(p for p in wanted if p in manifest)


def fetch(out, subjects, pycortex=False, manifest=None, base_url=None):
    """Download fetch_list's files into `out` in ds003020's layout, each from the manifest's address
    (the object's version id included, so every user gets the same bytes) under `base_url` (a mirror;
    default OpenNeuro's, or $BRAINTUNE_MIRROR). A file goes to <name>.part, resumed with an HTTP Range
    after an interruption, is checked against the size the server announces, then renamed: a file
    under its real name is complete, and a second run downloads nothing."""
    manifest = manifest or json.load(open(MANIFEST))
    base = (base_url or os.environ.get("BRAINTUNE_MIRROR") or OPENNEURO).rstrip("/")
    subjects = ["UT" + s if "UT" + s in REAL_SUBJECTS else s for s in subjects]
    for s in subjects:
        if s not in REAL_SUBJECTS:
            raise ValueError(f"--subject {s}: not a subject of ds003020; they are {', '.join(REAL_SUBJECTS)}")
    other = sorted(set(os.listdir(out)) - {"derivative", "stimuli"}) if os.path.isdir(out) else []
    if os.path.exists(out) and (other or not os.path.isdir(out)):
        raise ValueError(f"{out}: already holds {', '.join(other) or 'a file'}; fetch into a new folder or an earlier fetch's")
    paths = fetch_list(manifest, subjects, pycortex)
    url = lambda p: base + manifest[p][len(OPENNEURO):]
    done = lambda: sum(os.path.isfile(os.path.join(out, p)) for p in paths)

    def failed(p, e):  # the one line for a network or server error
        if isinstance(e, urllib.error.HTTPError):
            return ValueError(f"{p}: HTTP {e.code} {e.reason} from {url(p).split('?')[0]}")
        return ValueError(f"cannot reach {base} ({getattr(e, 'reason', e)}); {done()} of {len(paths)} files are "
                          "complete, run the same command again to resume")

    def size(p):
        try:
            with urllib.request.urlopen(urllib.request.Request(url(p), method="HEAD"), timeout=60) as r:
                return int(r.headers["Content-Length"])
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise failed(p, e) from None
    print(f"ds003020 2.2.0 for {', '.join(subjects)}: {len(paths)} files into {out}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sizes = dict(zip(paths, pool.map(size, paths)))
    todo = [p for p in paths if not os.path.isfile(os.path.join(out, p)) or os.path.getsize(os.path.join(out, p)) != sizes[p]]
    part = lambda p: os.path.join(out, p) + ".part"
    need = sum(sizes[p] - (os.path.getsize(part(p)) if os.path.isfile(part(p)) else 0) for p in todo)
    os.makedirs(out, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(f"{sum(sizes.values()) / 1e9:.1f} GB in all; {len(todo)} files, {need / 1e9:.1f} GB, to download "
          f"({free / 1e9:.0f} GB free)", flush=True)
    if need > free:
        raise ValueError(f"{out}: {need / 1e9:.1f} GB to download but {free / 1e9:.1f} GB free")
    overall = tqdm(total=need, unit="B", unit_scale=True, desc="ds003020", disable=not sys.stderr.isatty())
    last = t0 = time.time()
    for i, p in enumerate(todo):
        os.makedirs(os.path.dirname(part(p)), exist_ok=True)
        have = os.path.getsize(part(p)) if os.path.isfile(part(p)) else 0
        if have >= sizes[p]:  # complete but not renamed (killed in between), or not this file
            os.replace(part(p), os.path.join(out, p)) if have == sizes[p] else os.remove(part(p))
            if have == sizes[p]:
                continue
            have = 0
        request = urllib.request.Request(url(p), headers={"Range": f"bytes={have}-"} if have else {})
        one = tqdm(total=sizes[p], initial=have, unit="B", unit_scale=True, desc=os.path.basename(p), leave=False,
                   disable=overall.disable)
        try:
            with urllib.request.urlopen(request, timeout=60) as r, open(part(p), "ab" if r.status == 206 else "wb") as f:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    overall.update(len(chunk))
                    one.update(len(chunk))
                    if not sys.stderr.isatty() and time.time() - last > 30:
                        last = time.time()
                        print(f"fetched {overall.n / 1e9:.2f} of {need / 1e9:.2f} GB, {i} of {len(todo)} files, "
                              f"{last - t0:.0f} s", file=sys.stderr, flush=True)
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            raise failed(p, e) from None
        except OSError as e:
            raise ValueError(f"{part(p)}: cannot write ({e.strerror}); free some space and run the same command "
                             "again to resume") from None
        finally:
            one.close()
        got = os.path.getsize(part(p))
        if got < sizes[p]:  # the connection dropped
            raise ValueError(f"{p}: the transfer stopped at {got} of {sizes[p]} bytes; {done()} of {len(paths)} "
                             "files are complete, run the same command again to resume")
        if got > sizes[p]:
            os.remove(part(p))
            raise ValueError(f"{p}: {got} bytes arrived where the server announced {sizes[p]}; not kept")
        os.replace(part(p), os.path.join(out, p))
    overall.close()
    print(f"{done()} of {len(paths)} files complete in {out}", flush=True)
    return paths


# -----------------------------------------------------------------------------
# the synthetic dataset: speech-like audio, and responses with a known ground truth

SYNTHETIC = "synthetic-v2"  # the quick start's dataset, under the cache; v2: TextGrids with braces and stress
DEMO_SR = 22050  # not 16 kHz, so that the reader's resampling is exercised
CONSONANTS = {"K": 1800, "T": 4200, "P": 700, "S": 6000, "SH": 3000, "F": 7000, "HH": 1200}  # noise centre, Hz
VOWELS = {"AA": (730, 1090), "IY": (270, 2290), "UW": (300, 870), "EH": (530, 1840), "AO": (570, 840),
          "AE": (660, 1720)}  # formants F1, F2, Hz
GRID = 10  # Hz: the time grid on which the true features live before the haemodynamic response


def _burst(rng, centre, n):  # a consonant: noise in a band around `centre`
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / DEMO_SR)
    return np.fft.irfft(spec * np.exp(-0.5 * ((f - centre) / (0.15 * centre)) ** 2), n) * np.hanning(n)


def _vowel(f0, formants, n):  # a vowel: harmonics of f0 shaped by two formant resonances
    t = np.arange(n) / DEMO_SR
    x = np.zeros(n)
    for h in range(1, int(4000 / f0)):
        amp = sum(1 / (1 + ((h * f0 - F_) / 80) ** 2) for F_ in formants)
        x += amp * np.sin(2 * np.pi * h * f0 * t * (1 + 0.03 * t))  # a slight pitch glide
    return x * np.hanning(n) / 4


def _story(rng, vocab, seconds):
    """Audio (samples,) and a list of words (word, start, end, [(phone, start, end)])."""
    f0, nc = rng.uniform(100, 140), int(0.06 * DEMO_SR)  # each story has its own speaker pitch
    lengths = [int(d * DEMO_SR) for d in (0.12, 0.15, 0.18)]
    vowel = {(v, n): _vowel(f0, VOWELS[v], n) for v in VOWELS for n in lengths}
    burst = {(c, i): _burst(rng, CONSONANTS[c], nc) for c in CONSONANTS for i in range(4)}
    chunks, words, t = [], [], 0.0
    while t < seconds - 8:
        for _ in range(rng.integers(4, 9)):  # one sentence
            word = vocab[rng.integers(len(vocab))]
            phones, start = [], t
            for c, v in word[1]:
                nv = lengths[rng.integers(3)]
                chunks += [burst[c, rng.integers(4)], vowel[v, nv]]
                phones += [(c, t, t + nc / DEMO_SR), (v, t + nc / DEMO_SR, t + (nc + nv) / DEMO_SR)]
                t += (nc + nv) / DEMO_SR
            words.append((word[0], start, t, phones))
            gap = int(rng.uniform(0.08, 0.2) * DEMO_SR)
            chunks.append(np.zeros(gap))
            t += gap / DEMO_SR
        gap = int(rng.uniform(0.5, 0.9) * DEMO_SR)
        chunks.append(np.zeros(gap))
        t += gap / DEMO_SR
    audio = np.concatenate(chunks)
    return np.pad(audio, (0, int(seconds * DEMO_SR) - len(audio))), words


def _band_energies(audio, n_bands=8):  # (GRID-rate frames, n_bands) log energy, 100 Hz .. 8 kHz
    hop = DEMO_SR // GRID
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    power = np.abs(np.fft.rfft(frames * np.hanning(hop), axis=1)) ** 2
    f = np.fft.rfftfreq(hop, 1 / DEMO_SR)
    edges = np.geomspace(100, 8000, n_bands + 1)
    return np.log(1e-3 + np.stack([power[:, (f >= a) & (f < b)].sum(1) for a, b in zip(edges, edges[1:])], 1))


def hrf(t):
    """The canonical double-gamma haemodynamic response (SPM): peak near 5 s, undershoot near 15 s."""
    return gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6


def _textgrid(path, words, seconds):
    """Praat's long text format: tier 1 'phone', tier 2 'word'; pauses are 'sp', every fifth a breath
    '{BR}', and vowels carry stress digits (1 in a word's first syllable, else 0), as in ds003020."""
    def tier(name, items):
        filled, t = [], 0.0
        for label, a, b in items:
            if a > t + 1e-9:
                filled.append(("{BR}" if len(filled) % 5 == 4 else "sp", t, a))
            filled.append((label, a, b))
            t = b
        filled.append(("sp", t, seconds))
        lines = ['        class = "IntervalTier"', f'        name = "{name}"', "        xmin = 0",
                 f"        xmax = {seconds}", f"        intervals: size = {len(filled)}"]
        for i, (label, a, b) in enumerate(filled, 1):
            lines += [f"        intervals [{i}]:", f"            xmin = {a}", f"            xmax = {b}",
                      f'            text = "{label}"']
        return lines
    phones = [(p + ("1" if i == 1 else "0") if p in VOWELS else p, a, b) for w in words for i, (p, a, b) in enumerate(w[3])]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {seconds}",
             "tiers? <exists>", "size = 2", "item []:", "    item [1]:", *tier("phone", phones),
             "    item [2]:", *tier("word", [w[:3] for w in words])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_demo(out, n_subjects=3, n_stories=10, n_voxels=500, seed=0, seconds=150.0, n_vocab=40, dim=16,
              repeats=10, tr=TR, snr=(0.2, 2.0), sr=DEMO_SR, channels=1):
    """Write a synthetic dataset in the ds003020 layout, stored as the real one is (float64 hf5).
    Voxels are of three kinds: 'AC' voxels respond to band energies, 'semantic' voxels to the
    meaning vectors of the words being spoken, the rest to nothing; each sees its features through
    the canonical HRF, plus Gaussian noise at a signal-to-noise ratio drawn log-uniformly from `snr`.
    Subjects share the feature spaces, with their own weights. The ground truth keeps each story's
    features and each subject's weights (clean responses: zscore(features @ weights)); one story's
    responses are in memory at a time, so a subject of the published size is written in < 2 GB."""
    rng = np.random.default_rng(seed)
    for d in ("stimuli", "derivative/TextGrids", "derivative/rois", "derivative/ground_truth"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    syll = [(c, v) for c in CONSONANTS for v in VOWELS]
    vocab, seen = [], set()
    while len(vocab) < n_vocab:  # pseudo-words of 1-3 syllables
        w = tuple(syll[i] for i in rng.choice(len(syll), rng.integers(1, 4)))
        if w not in seen:
            seen.add(w)
            vocab.append(("".join(c + v for c, v in w).lower(), w))
    emb = {w: rng.standard_normal(dim) for w, _ in vocab}
    with open(os.path.join(out, "derivative", "embeddings.txt"), "w") as f:
        f.writelines(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in emb.items())
    names = TRAIN_STORIES + [f"story{i + 1:02d}" for i in range(len(TRAIN_STORIES), n_stories)]
    stories = names[:n_stories] + [TEST_STORY]
    n_rows = int((seconds + SOUND_START - tr / 2) / tr) - TRIM_START  # last row inside the audio
    t_rows = row_times(n_rows, tr)
    k = np.arange(0, 32, 1 / GRID)
    features = {}  # story -> (rows, 8 + dim): band energies and meaning, through the HRF
    for s in progress(stories, "synthetic audio"):
        audio, words = _story(rng, vocab, seconds)
        pcm = audio / np.abs(audio).max() * 0.9 * 32767
        pcm = (resample_poly(pcm.astype(np.float32), sr, DEMO_SR) if sr != DEMO_SR else pcm).astype(np.int16)
        if channels > 1:  # the other channels a little quieter
            pcm = np.stack([(pcm.astype(np.int32) * (5 - c) // 5).astype(np.int16) for c in range(channels)], 1)
        wavfile.write(wav_path(out, s), sr, pcm)
        _textgrid(textgrid_path(out, s), words, seconds)
        low = zscore(_band_energies(audio))
        sem = np.zeros((len(low), dim))
        for w, a, b, _ in words:
            sem[int(a * GRID):int(b * GRID) + 1] += emb[w]
        x = np.concatenate([low, sem], 1)
        x = np.stack([np.convolve(col, hrf(k))[: len(x)] / GRID for col in x.T], 1)
        features[s] = zscore(x[np.round(t_rows * GRID).astype(int)])
    for j in range(n_subjects):
        subj = f"UTS{j + 1:02d}"
        os.makedirs(os.path.join(out, "derivative", "preprocessed_data", subj), exist_ok=True)
        kind = rng.permutation(np.arange(n_voxels) * 3 // n_voxels)  # 0 AC, 1 semantic, 2 neither
        W = rng.standard_normal((8 + dim, n_voxels))
        W[8:, kind == 0] = 0
        W[:8, kind == 1] = 0
        W[:, kind == 2] = 0
        ratio = np.where(kind < 2, np.exp(rng.uniform(*np.log(snr), n_voxels)), 0.0)
        noise_sd = np.where(kind < 2, 1 / np.sqrt(np.maximum(ratio, 1e-12)), 1.0)
        truth = {"weights": W, "snr": ratio, "noise_sd": noise_sd, "kind": kind,
                 **{f"features_{s}": features[s] for s in stories}}
        for s in progress(stories, f"synthetic {subj}"):
            clean = features[s] @ W  # (rows, voxels); in place from here on: a story is ~200 MB
            zscore_(clean)  # unit variance; voxels of neither kind have zero weights, so stay 0
            total = np.zeros_like(clean)
            with h5py.File(response_path(out, subj, s), "w") as f:
                n = repeats if s == TEST_STORY else 1  # repeat by repeat: one repeat in memory at a time
                reps = f.create_dataset("individual_repeats", (n, *clean.shape), np.float64) if n > 1 else None
                for i in range(n):
                    noisy = rng.standard_normal(clean.shape)
                    noisy *= noise_sd
                    noisy += clean
                    total += noisy
                    if reps is not None:
                        reps[i] = noisy
                zscore_(total)
                f["data"] = total
        np.savez(os.path.join(out, "derivative", "rois", subj + ".npz"),
                 AC=np.flatnonzero(kind == 0), semantic=np.flatnonzero(kind == 1))
        np.savez(os.path.join(out, "derivative", "ground_truth", subj + ".npz"), **truth)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="braintune data tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download what braintune reads of OpenNeuro ds003020 2.2.0")
    f.add_argument("dataset", choices=["ds003020"], help="the dataset (ds003020, the only one)")
    f.add_argument("--out", default=None, help="folder to fetch into (default: ./ds003020)")
    f.add_argument("--subject", default="UTS01", help="subjects, comma-separated (UTS01..UTS08; S01 works too)")
    f.add_argument("--pycortex", action="store_true", help="also their pycortex database (ROIs, flatmaps)")
    f.add_argument("--base-url", default=None, help=f"a mirror of {OPENNEURO} (or $BRAINTUNE_MIRROR)")
    d = sub.add_parser("demo", help="write a synthetic dataset in the ds003020 layout")
    d.add_argument("out", help="folder to write (must not exist yet)")
    d.add_argument("--subjects", type=int, default=3, help="number of subjects")
    d.add_argument("--stories", type=int, default=10, help="training stories (a test story is added)")
    d.add_argument("--voxels", type=int, default=500, help="voxels per subject")
    d.add_argument("--seconds", type=float, default=150.0, help="length of each story in seconds")
    d.add_argument("--sr", type=int, default=DEMO_SR, help="sample rate of the wav files (ds003020: 44100)")
    d.add_argument("--channels", type=int, default=1, help="channels of the wav files (ds003020: 2)")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    if a.cmd == "fetch":
        try:
            fetch(a.out or a.dataset, a.subject.split(","), a.pycortex, base_url=a.base_url)
        except ValueError as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:
            sys.exit("interrupted; the files under their real names are complete: run the same command again to resume")
        return
    for flag, ok, want in (("--subjects", a.subjects >= 1, "at least 1"), ("--stories", a.stories >= 2, "at least 2"),
                           ("--voxels", a.voxels >= 3, "at least 3"), ("--seconds", a.seconds >= 30, "at least 30"),
                           ("--sr", a.sr >= 8000, "at least 8000"), ("--channels", 1 <= a.channels <= 8, "1 to 8")):
        if not ok:
            sys.exit(f"error: {flag} {getattr(a, flag[2:])}: must be {want} (nothing was written)")
    if os.path.exists(a.out):
        sys.exit(f"error: {a.out} already exists; choose a new folder (nothing was written)")
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_demo(tmp, a.subjects, a.stories, a.voxels, a.seed, a.seconds, sr=a.sr, channels=a.channels)
    os.rename(tmp, a.out)  # a killed run leaves no half dataset under the name asked for
    print(f"wrote a synthetic dataset to {a.out}")


if __name__ == "__main__":
    main()
