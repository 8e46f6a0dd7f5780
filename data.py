"""
The data: spoken stories, their audio, and the fMRI responses of the people who heard them.

Reads the real dataset (LeBel et al. 2023, OpenNeuro ds003020; fetch.py downloads it) or the
synthetic one (synthetic.py writes it), both in this layout:
    derivative/preprocessed_data/<SUBJ>/<story>.hf5   key "data": (TRs, voxels) float64
    stimuli/<story>.wav
    derivative/TextGrids/<story>.TextGrid             tier 0 phones, tier 1 words
    derivative/rois/<SUBJ>.npz                        one key per ROI: hf5 column indices or a mask
Each fMRI frame (TR) becomes one example: the H TRs of audio heard before it, and its response.
A whole subject is ~20 GB of float64 and ~10 GB of 44.1 kHz audio, so each file is read once into
a cache of float32 .npy files (cache.py) that runs memory-map. What listings and file headers
can tell is checked before anything is read (preflight.py); the alignments are textgrid.py's.

    ds, shared = prepare(root, ["UTS01"], history=6)              # [Subject], {split: Windows}
"""
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.functional as AF
from scipy.io import wavfile

import voxels
from cache import cached, file_key, progress
from voxels import open_hf5

SR = 16000  # every torchaudio speech model takes 16 kHz audio
TR = 2.0045  # seconds, from the scanner's trigger files
TRIM_START = 10  # TRs the hf5 files drop at the start of each run
SOUND_START = 10.0  # seconds from the start of the run to the start of the audio
TEST_STORY = "wheretheressmoke"
TRAIN_STORIES = ("alternateithicatom souls avatar legacy odetostepfather undertheinfluence "
                 "howtodraw myfirstdaywiththeyankees naked life stagefright tildeath "
                 "fromboyhoodtofatherhood sloth "
                 "exorcism haveyoumethimyet adollshouse inamoment theclosetthatateeverything "
                 "adventuresinsayingyes buck swimmingwithastronauts thatthingonmyarm eyespy "
                 "itsabox "
                 "hangtime").split()


def row_times(n_rows, tr=TR, trim_start=TRIM_START, sound_start=SOUND_START, lag=0):
    """Seconds from audio onset at the centre of each hf5 row: row r is scanner TR r + trim_start,
    and scanner TR i is centred at i * tr - sound_start + tr / 2; less `lag` TRs, where each
    row's training window ends (--lag)."""
    return (np.arange(n_rows) + trim_start - lag) * tr - sound_start + tr / 2


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
    raise ValueError(f"unknown subject {subject!r} in {root}; present: "
                     f"{', '.join(present) or 'none'}")


def response_path(root, subj, story):
    return os.path.join(root, "derivative", "preprocessed_data", subj, story + ".hf5")


def wav_path(root, story):
    return os.path.join(root, "stimuli", story + ".wav")


def open_wav(path):
    """A WAV file's sample rate and its samples, (samples,) or (samples, channels), memory-mapped;
    one sentence naming the file where it cannot be read, its header says 0 Hz, or it is empty."""
    try:
        sr, x = wavfile.read(path, mmap=True)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read as WAV ({e})") from None
    if sr <= 0 or not len(x):
        raise ValueError(f"{path}: " + (f"its header says {sr} Hz" if sr <= 0 else "no samples"))
    return sr, x


def read_wav(path):
    """Any WAV (int16, int32, uint8, float; mono or multi-channel) -> (samples,) float32 at 16 kHz.
    A float WAV holding NaN or inf is refused, naming the file and the time."""
    sr, x = open_wav(path)
    if x.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))  # (samples,) read once
        if len(bad):
            raise ValueError(f"{path}: {len(bad)} samples are NaN or infinite, the first at "
                             f"{bad[0] / sr:.2f} s")
    scales = {np.dtype(np.int16): 2 ** 15, np.dtype(np.int32): 2 ** 31, np.dtype(np.uint8): 128}
    scale = scales.get(x.dtype, 1)
    mono = x.mean(1, dtype=np.float32) if x.ndim == 2 else x.astype(np.float32)  # (samples,)
    mono = torch.from_numpy((mono - (128 if x.dtype == np.uint8 else 0)) / scale)
    return AF.resample(mono, sr, SR) if sr != SR else mono


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
    of a whole subject is 100-200 MB); constant columns become 0. Returns the standard deviations.
    """
    x -= x.mean(0, dtype=np.float64).astype(x.dtype)
    sd = np.sqrt(np.einsum("ij,ij->j", x, x, dtype=np.float64) / max(len(x), 1)).astype(x.dtype)
    x /= np.where(sd > 0, sd, 1)
    return sd


def splits(root, subj, test_stories=None, val_stories=None, train_stories=None):
    """{"train", "val", "test"}: a subject's stories. Every story with responses must have audio.
    Audio with no responses is a story this subject did not hear (UTS04-08 heard 27 of 84).
    train_stories (--train-stories) restricts the training split to the stories it names, each
    one that would otherwise be a training story of the subject."""
    folder = os.path.join(root, "derivative", "preprocessed_data", subj)
    resp = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".hf5"))
    stim = os.path.join(root, "stimuli")
    audio = set()
    if os.path.isdir(stim):
        audio = {f[:-4] for f in os.listdir(stim) if f.endswith(".wav")}
    for s in resp:
        if s not in audio:
            raise ValueError(f"story {s!r} has responses for {subj} but no audio "
                             f"{wav_path(root, s)}")
    test = test_stories or ([TEST_STORY] if TEST_STORY in resp else resp[-1:])
    rest = [s for s in resp if s not in test]
    val = val_stories or (["stagefright"] if "stagefright" in rest else rest[-1:])
    if set(val) & set(test) or len(set(val)) < len(val) or len(set(test)) < len(test):
        raise ValueError(f"--val-stories {','.join(val)} and --test-stories {','.join(test)}: a "
                         "story may be in one of them once, never in both (early stopping on a "
                         "test story inflates every test r)")
    for s in test + val:
        if s not in resp:
            why = "" if s in audio else " and no audio"
            raise ValueError(f"story {s!r} has no responses for {subj}{why}; its stories are: "
                             f"{', '.join(resp)}")
    train = [s for s in rest if s not in val]
    for s in train_stories or ():
        if s not in train:
            raise ValueError(f"--train-stories: {s!r} is not a training story of {subj} (not "
                             "heard, or a test or validation story); its training stories are: "
                             f"{', '.join(train)}")
    if train_stories:
        train = [s for s in train if s in set(train_stories)]  # the subject's order, as without
    if not train:
        raise ValueError(f"{subj} has no training stories left after test {test} and validation "
                         f"{val}")
    return dict(train=train, val=val, test=test)


def story_responses(root, subj, story, drop_nonfinite=False):
    """{"data": (TRs, voxels) float32 z-scored, memory-mapped; "good": (voxels,) finite and not
    constant in this story; "bad_rows": the rows holding NaN or inf}. Read once from the hf5
    (converted to float32 while reading, so no float64 copy), then from the cache. Voxels not good
    are zero. NaN or inf is refused (nonfinite), unless drop_nonfinite leaves their voxels out."""
    path = response_path(root, subj, story)

    def build():
        with open_hf5(path) as f:
            if "data" not in f or f["data"].ndim != 2:
                raise ValueError(f"{path}: no (TRs, voxels) 'data' dataset (keys: "
                                 f"{', '.join(f.keys())})")
            x = np.empty(f["data"].shape, np.float32)
            f["data"].read_direct(x)
        finite = np.isfinite(x)  # (TRs, voxels)
        entry = {"data": x, "good": finite.all(0), "bad_rows": np.flatnonzero(~finite.all(1))}
        nonfinite(path, entry, drop_nonfinite)  # before the cache keeps anything of it
        np.nan_to_num(x, copy=False)
        entry["good"] &= zscore_(x) > 0
        x[:, ~entry["good"]] = 0
        return entry
    entry = cached("responses", dict(file=file_key(path), v=2), build, story)
    nonfinite(path, entry, drop_nonfinite)
    return entry


def nonfinite(path, entry, drop):
    """Refuses a story's responses (story_responses' entry) holding NaN or inf, naming the file
    and its rows, unless drop (--drop-nonfinite-voxels): then their voxels are left out."""
    rows = entry["bad_rows"]
    if len(rows) and not drop:
        some = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ValueError(f"{path}: NaN or inf in {len(rows)} of its {len(entry['data'])} rows "
                         f"(row {some}); --drop-nonfinite-voxels leaves out the voxels that hold "
                         "them")


def load_responses(root, subj, stories, drop_nonfinite=False):
    """{story: (TRs, voxels) z-scored per story, memory-mapped}, and the mask of usable voxels
    (finite and not constant in every story); the others are left out of fitting and every mean.
    NaN or inf is refused, or with drop_nonfinite its voxels left out (story_responses)."""
    resp, good = {}, None
    for s in progress(stories, f"{subj} responses"):
        e = story_responses(root, subj, s, drop_nonfinite)
        if good is not None and len(e["good"]) != len(good):
            raise ValueError(f"{os.path.dirname(response_path(root, subj, s))}: stories have "
                             f"different voxel counts ({len(good)}, and {len(e['good'])} in {s})")
        resp[s], good = e["data"], e["good"] if good is None else good & e["good"]
    if not good.any():
        raise ValueError(f"{os.path.dirname(response_path(root, subj, stories[0]))}: every voxel "
                         "is NaN, infinite or constant in some story; none is left to fit")
    if not good.all():
        warnings.warn(f"{subj}: {(~good).sum()} of {good.size} voxels are constant or NaN in some "
                      "story; they are left out of fitting and of every mean")
    return resp, good


class Responses:
    """A split's responses as one (rows, voxels) matrix that is never in memory whole: Y[rows, cols]
    reads those rows and columns from each story's memory-mapped file, as a float32 tensor.
    Voxels outside `good` read as 0."""

    def __init__(self, parts, good, keys=None):
        self.parts, self.good = parts, np.asarray(good)
        self.keys = keys  # the stories' files, for the caches
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), len(self.good))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        if isinstance(cols, torch.Tensor):
            cols = np.asarray(cols)
        cols = np.arange(self.shape[1])[cols]
        if len(cols) and cols[-1] - cols[0] + 1 == len(cols):
            take = slice(cols[0], cols[-1] + 1)  # a block of columns is one copy per row
        else:
            take = cols
        if isinstance(rows, slice) and rows == slice(None):
            empty = np.zeros((0, len(cols)), np.float32)
            out = np.concatenate([p[:, take] for p in self.parts] or [empty])
        else:
            rows = np.arange(len(self))[np.asarray(rows)]
            part = np.searchsorted(self.starts, rows, "right") - 1
            out = np.zeros((0, len(cols)), np.float32)
            if len(rows):
                out = np.stack([self.parts[s][r - self.starts[s], take]
                                for s, r in zip(part, rows)])
        out = np.array(out, np.float32, copy=None)
        out *= self.good[cols]
        return torch.from_numpy(out)


def load_audio(root, stories):
    """{story: (samples,) float32 at 16 kHz, memory-mapped}: each wav read and resampled once."""
    def one(s):
        def build():
            return {"wave": read_wav(wav_path(root, s)).numpy()}
        key = dict(file=file_key(wav_path(root, s)), sr=SR, torchaudio=torchaudio.__version__)
        return cached("audio", key, build, s)["wave"]
    return {s: one(s) for s in progress(stories, "audio")}


def roi_path(root, subj):
    return os.path.join(root, "derivative", "rois", subj + ".npz")


def textgrid_path(root, story):
    return os.path.join(root, "derivative", "TextGrids", story + ".TextGrid")



# -----------------------------------------------------------------------------
# delayed-TR windows

def before_audio(story, t, lag=0):
    """The sentence for an fMRI frame that would need audio from before the story starts (t: its
    time, or with a lag the end of its window)."""
    what = f"the window of its first fMRI frame, --lag {lag} TRs earlier, ends" if lag else \
        "its first fMRI frame is"
    return (f"story {story!r}: {what} at {t:.1f} s, before the audio starts (see --sound-start, "
            "--trim-start, --tr)")


class Windows(torch.utils.data.Dataset):
    """For row r of each story, the audio heard from t_r - H*TR to t_r (or, with a lag, lag TRs
    earlier), sliced on the fly from the story's (memory-mapped) 16 kHz wave. rows: {story: number
    of fMRI frames, or its responses};
    keys: {story: what identifies its audio} for the feature cache. Yields (wave (samples,), story
    index, row index)."""

    def __init__(self, waves, rows, stories, *, history=6, tr=TR, trim_start=TRIM_START,
                 sound_start=SOUND_START, lag=0, keys=None):
        self.stories, self.n_samples = list(stories), round(history * tr * SR)
        self.waves = [waves[s] for s in self.stories]
        self.keys = [keys[s] for s in self.stories] if keys else None
        self.timing = dict(history=history, tr=tr, trim_start=trim_start, sound_start=sound_start,
                           lag=lag)  # in the feature cache's key
        self.ends = []  # (rows,) sample at which each window ends
        for s, wave in zip(self.stories, self.waves):
            n = rows[s] if isinstance(rows[s], (int, np.integer)) else len(rows[s])
            ends = np.round(row_times(n, tr, trim_start, sound_start, lag) * SR).astype(np.int64)
            if n and ends[-1] - len(wave) > tr * SR:
                raise ValueError(f"story {s!r}: audio is {len(wave) / SR:.1f} s long but its last "
                                 f"fMRI frame needs audio up to {ends[-1] / SR:.1f} s")
            if n and ends[0] < 0:
                raise ValueError(before_audio(s, ends[0] / SR, lag))
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


@dataclass
class Subject:
    """One subject's data, as prepare() returns it (splits: "train", "val", "test")."""
    name: str  # UTS01, S01 ...
    stories: dict  # {split: [story]}
    windows: dict  # {split: Windows}: the audio before each of the subject's rows, (rows,) windows
    Y: dict  # {split: Responses}: (rows, voxels) float32, z-scored per story
    window_of: dict  # {split: (rows,) LongTensor}: the shared window (prepare's) of each row
    row_of: dict  # {split: (shared windows,) LongTensor}: each shared window's row, -1: not heard
    good: np.ndarray  # (voxels,) bool: finite and not constant in every story
    rois: dict  # {ROI name: (n,) voxel indices}
    ceiling: np.ndarray = None  # (voxels,) the test story's noise ceiling (cc_max), if repeated


def prepare(root, subjects, test_stories=None, val_stories=None, train_stories=None, *,
            drop_nonfinite=False, **window_kw):
    """Each subject's splits, responses, usable voxels, ROIs and noise ceiling, and the windows the
    subjects share: one per (story, row), however many subjects heard it, so each is forwarded once.
    Every subject is held out on the first subject's test and validation stories, and trained on
    train_stories where given (splits); drop_nonfinite: see story_responses.
    Returns (ds, shared): ds a list of Subject, shared {split: Windows} of the audio alone."""
    ds, waves, keys = [], {}, {}
    for name in subjects:
        subj = find_subject(root, name)
        if any(d.name == subj for d in ds):
            raise ValueError(f"subject {subj} is given twice")
        stories = splits(root, subj, test_stories, val_stories, train_stories)
        test_stories, val_stories = stories["test"], stories["val"]  # the same for every subject
        resp, good = load_responses(root, subj, [s for v in stories.values() for s in v],
                                    drop_nonfinite)
        waves.update(load_audio(root, [s for s in resp if s not in waves]))  # each story read once
        keys.update({s: file_key(wav_path(root, s)) for s in resp})
        windows = {k: Windows(waves, resp, v, keys=keys, **window_kw) for k, v in stories.items()}
        Y = {k: Responses([resp[s] for s in v], good,
                          [file_key(response_path(root, subj, s)) for s in v])
             for k, v in stories.items()}
        test = stories["test"]
        ceiling = None
        if len(test) == 1:
            ceiling = voxels.story_ceiling(response_path(root, subj, test[0]), subj)
        ds.append(Subject(subj, stories, windows, Y, {}, {}, good,
                          voxels.roi_sets(roi_path(root, subj), len(good)), ceiling))
    shared = {}
    for split in ("train", "val", "test"):
        rows = {}  # story -> rows, in first-heard order
        for d in ds:
            for s, ends in zip(d.windows[split].stories, d.windows[split].ends):
                rows[s] = max(rows.get(s, 0), len(ends))
        # row r of a story is the same audio for every subject: targets are found through window_of
        shared[split] = Windows(waves, rows, list(rows), keys=keys, **window_kw)
        start = dict(zip(rows, np.cumsum([0] + list(rows.values()))))
        for d in ds:
            heard = zip(d.windows[split].stories, d.windows[split].ends)
            window_of = np.concatenate([start[s] + np.arange(len(e)) for s, e in heard])
            d.window_of[split] = torch.as_tensor(window_of)
            d.row_of[split] = torch.full((len(shared[split]),), -1, dtype=torch.long)
            d.row_of[split][window_of] = torch.arange(len(window_of))
    return ds, shared
