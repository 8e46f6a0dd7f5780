"""
The data: spoken stories, their audio, and the fMRI responses of the people who heard them.

Reads the real dataset (LeBel et al. 2023, OpenNeuro ds003020) and writes a synthetic one in the
same layout with a known ground truth:
    derivative/preprocessed_data/<SUBJ>/<story>.hf5   key "data": (TRs, voxels)
    stimuli/<story>.wav
    derivative/TextGrids/<story>.TextGrid             tier 0 phones, tier 1 words
    derivative/rois/<SUBJ>.npz                        one key per ROI: hf5 column indices or a mask
Each fMRI frame (TR) becomes one example: the H TRs of audio heard before it, and its response.

    python data.py demo OUT [--subjects 3 --stories 10 --voxels 500 --seed 0]
"""
import argparse
import os
import re
import sys
import warnings

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from scipy.io import wavfile
from scipy.stats import gamma

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


def read_wav(path):
    """Any WAV (int16, int32, uint8, float; mono or multi-channel) -> (samples,) float32 at 16 kHz."""
    try:
        sr, x = wavfile.read(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read as WAV ({e})") from None
    scale = {np.dtype(np.int16): 2 ** 15, np.dtype(np.int32): 2 ** 31, np.dtype(np.uint8): 128}.get(x.dtype, 1)
    x = (x.astype(np.float32) - (128 if x.dtype == np.uint8 else 0)) / scale
    if x.ndim == 2:
        x = x.mean(1)  # (samples, channels) -> mono
    return AF.resample(torch.from_numpy(x), sr, SR) if sr != SR else torch.from_numpy(x)


def read_hf5(path, key="data"):
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise ValueError(f"{path}: no {key!r} dataset (keys: {', '.join(f.keys())})")
            return np.asarray(f[key], dtype=np.float32)
    except OSError as e:
        raise ValueError(f"{path}: cannot read as HDF5 ({e})") from None


def zscore(x, axis=0):
    x = x - x.mean(axis, keepdims=True)
    return x / np.where(x.std(axis, keepdims=True) > 0, x.std(axis, keepdims=True), 1)


def splits(root, subj, test_stories=None, val_stories=None):
    """(train, val, test) story lists for a subject. Every story with responses must have audio.
    Audio with no responses is a story this subject did not hear (UTS04-08 heard 27 of 84)."""
    resp = sorted(f[:-4] for f in os.listdir(os.path.join(root, "derivative", "preprocessed_data", subj))
                  if f.endswith(".hf5"))
    stim = os.path.join(root, "stimuli")
    audio = {f[:-4] for f in os.listdir(stim) if f.endswith(".wav")} if os.path.isdir(stim) else set()
    for s in resp:
        if s not in audio:
            raise ValueError(f"story {s!r} has responses for {subj} but no audio {os.path.join(stim, s + '.wav')}")
    test = test_stories or ([TEST_STORY] if TEST_STORY in resp else resp[-1:])
    rest = [s for s in resp if s not in test]
    val = val_stories or (["stagefright"] if "stagefright" in rest else rest[-1:])
    for s in test + val:
        if s not in resp:
            raise ValueError(f"story {s!r} has no responses for {subj}{'' if s in audio else ' and no audio'}; "
                             f"its stories are: {', '.join(resp)}")
    train = [s for s in rest if s not in val]
    if not train:
        raise ValueError(f"{subj} has no training stories left after test {test} and validation {val}")
    return train, val, test


def load_responses(root, subj, stories):
    """{story: (TRs, voxels) z-scored per story}, and the mask of usable voxels (not constant and
    not NaN in any story); unusable voxels are zeroed so they never turn a mean into NaN."""
    d = os.path.join(root, "derivative", "preprocessed_data", subj)
    resp = {s: read_hf5(os.path.join(d, s + ".hf5")) for s in stories}
    n_vox = {r.shape[1] for r in resp.values()}
    if len(n_vox) != 1:
        raise ValueError(f"{d}: stories have different voxel counts {sorted(n_vox)}")
    good = np.ones(n_vox.pop(), bool)
    for r in resp.values():
        good &= np.isfinite(r).all(0) & (np.nan_to_num(r).std(0) > 0)
    if not good.all():
        warnings.warn(f"{subj}: {(~good).sum()} of {good.size} voxels are constant or NaN in some story; "
                      f"they are left out of fitting and of every mean")
    return {s: zscore(np.where(good, np.nan_to_num(r), 0)) * good for s, r in resp.items()}, good


def noise_ceiling(repeats):
    """cc_max per voxel from (repeats, TRs, voxels) (Schoppe et al. 2016); NaN where SP <= 0."""
    N = repeats.shape[0]
    var_sum = repeats.sum(0).var(0)  # (voxels,)
    sum_var = repeats.var(1).sum(0)
    SP = (var_sum - sum_var) / (N * (N - 1))
    TP = repeats.var(1).mean(0)
    cc = 1 / np.sqrt(1 + (1 / N) * (TP / np.where(SP > 0, SP, np.nan) - 1))
    return np.where(SP > 0, cc, np.nan)


def load_audio(root, stories):
    """{story: (samples,) at 16 kHz}: each story read and resampled once per run."""
    return {s: read_wav(os.path.join(root, "stimuli", s + ".wav")) for s in stories}


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


def words_and_phones(path, skip=("sentence_start", "sentence_end", "br", "lg", "ls", "ns", "sp", "")):
    """(phones, words) of a ds003020 TextGrid (tier 0 phones, tier 1 words), pauses and noises dropped."""
    tiers = list(read_textgrid(path).values())
    return [[(a, b, lab) for a, b, lab in t if lab.strip().lower() not in skip] for t in tiers[:2]]


# -----------------------------------------------------------------------------
# delayed-TR windows

class Windows(torch.utils.data.Dataset):
    """For row r of each story, the audio heard from t_r - H*TR to t_r, sliced on the fly.
    Yields (wave (samples,), response (voxels,), story index, row index)."""

    def __init__(self, waves, responses, stories, history=6, tr=TR, trim_start=TRIM_START,
                 sound_start=SOUND_START):
        self.stories, self.n_samples = list(stories), round(history * tr * SR)
        self.waves = [waves[s] for s in self.stories]
        self.resp = [torch.as_tensor(responses[s]) for s in self.stories]
        self.ends = []  # (rows,) sample at which each window ends
        for s, wave, resp in zip(self.stories, self.waves, self.resp):
            ends = np.round(row_times(len(resp), tr, trim_start, sound_start) * SR).astype(np.int64)
            if ends[-1] - len(wave) > tr * SR:
                raise ValueError(f"story {s!r}: audio is {len(wave) / SR:.1f} s long but its last fMRI "
                                 f"frame needs audio up to {ends[-1] / SR:.1f} s")
            self.ends.append(ends)
        self.index = [(i, r) for i, e in enumerate(self.ends) for r in range(len(e))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        s, r = self.index[i]
        wave, end = self.waves[s], int(self.ends[s][r])
        start = end - self.n_samples
        w = wave[max(start, 0):max(min(end, len(wave)), 0)]
        # zeros before the story starts; a short tail (under one TR) is silence too
        w = F.pad(w, (max(-start, 0), self.n_samples - max(-start, 0) - len(w)))
        return w, self.resp[s][r], s, r


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


def prepare(root, subjects, test_stories=None, val_stories=None, **window_kw):
    """Each subject's splits, responses, usable voxels, ROIs and noise ceiling, and the windows the
    subjects share: one per (story, row), however many subjects heard it, so each is forwarded once.
    Every subject is held out on the first subject's test and validation stories.
    Returns (ds, shared): ds[k]["Y<split>"] (rows, voxels) and ds[k]["take_<split>"] (rows,), the
    shared window of each of the subject's rows; shared[split] a Windows of the audio alone."""
    ds, waves = [], {}
    for name in subjects:
        subj = find_subject(root, name)
        if any(d["subject"] == subj for d in ds):
            raise ValueError(f"subject {subj} is given twice")
        train, val, test = splits(root, subj, test_stories, val_stories)
        test_stories, val_stories = test, val  # the same held-out stories for every subject
        resp, good = load_responses(root, subj, train + val + test)
        waves.update(load_audio(root, [s for s in resp if s not in waves]))  # each story read once
        d = dict(subject=subj, stories=dict(train=train, val=val, test=test), good=good,
                 rois=roi_sets(root, subj, len(good)), ceiling=None)
        for split, stories in d["stories"].items():
            d[split] = Windows(waves, resp, stories, **window_kw)
            d["Y" + split] = torch.cat([torch.as_tensor(resp[s]) for s in stories])  # (rows, voxels)
        if len(test) == 1:
            path = os.path.join(root, "derivative", "preprocessed_data", subj, test[0] + ".hf5")
            try:
                d["ceiling"] = noise_ceiling(read_hf5(path, "individual_repeats"))
            except ValueError:
                pass  # no repeats: no noise ceiling
        ds.append(d)
    shared = {}
    for split in ("train", "val", "test"):
        rows = {}  # story -> rows, in first-heard order
        for d in ds:
            for s, ends in zip(d[split].stories, d[split].ends):
                rows[s] = max(rows.get(s, 0), len(ends))
        # row r of a story is the same audio for every subject: targets are looked up through take_<split>
        shared[split] = Windows(waves, {s: np.zeros((n, 0), np.float32) for s, n in rows.items()}, list(rows),
                                **window_kw)
        start = dict(zip(rows, np.cumsum([0] + list(rows.values()))))
        for d in ds:
            d["take_" + split] = torch.as_tensor(np.concatenate(
                [start[s] + np.arange(len(e)) for s, e in zip(d[split].stories, d[split].ends)]))
    return ds, shared


# -----------------------------------------------------------------------------
# the synthetic dataset: speech-like audio, and responses with a known ground truth

DEMO_SR = 22050  # not 16 kHz, so that the reader's resampling is exercised
CONSONANTS = {"K": 1800, "T": 4200, "P": 700, "S": 6000, "SH": 3000, "F": 7000, "H": 1200}  # noise centre, Hz
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
    """Praat's long text format: tier 1 'phone', tier 2 'word'; pauses are 'sp'."""
    def tier(name, items):
        filled, t = [], 0.0
        for label, a, b in items:
            if a > t + 1e-9:
                filled.append(("sp", t, a))
            filled.append((label, a, b))
            t = b
        filled.append(("sp", t, seconds))
        lines = ['        class = "IntervalTier"', f'        name = "{name}"', "        xmin = 0",
                 f"        xmax = {seconds}", f"        intervals: size = {len(filled)}"]
        for i, (label, a, b) in enumerate(filled, 1):
            lines += [f"        intervals [{i}]:", f"            xmin = {a}", f"            xmax = {b}",
                      f'            text = "{label}"']
        return lines
    phones = [p for w in words for p in w[3]]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {seconds}",
             "tiers? <exists>", "size = 2", "item []:", "    item [1]:", *tier("phone", phones),
             "    item [2]:", *tier("word", [w[:3] for w in words])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_demo(out, n_subjects=3, n_stories=10, n_voxels=500, seed=0, seconds=150.0, n_vocab=40, dim=16,
              repeats=10, tr=TR, snr=(0.2, 2.0)):
    """Write a synthetic dataset in the ds003020 layout. Voxels are of three kinds: 'AC' voxels
    respond to band energies, 'semantic' voxels to the meaning vectors of the words being spoken,
    the rest to nothing; each sees its features through the canonical HRF, plus Gaussian noise at
    a signal-to-noise ratio drawn log-uniformly from `snr`. Subjects share the feature spaces, with
    their own weights."""
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
    stories = TRAIN_STORIES[:n_stories] + [TEST_STORY]
    n_rows = int((seconds + SOUND_START - tr / 2) / tr) - TRIM_START  # last row inside the audio
    t_rows = row_times(n_rows, tr)
    k = np.arange(0, 32, 1 / GRID)
    features = {}  # story -> (rows, 8 + dim): band energies and meaning, through the HRF
    for s in stories:
        audio, words = _story(rng, vocab, seconds)
        wavfile.write(os.path.join(out, "stimuli", s + ".wav"), DEMO_SR, (audio / np.abs(audio).max() * 0.9
                                                                          * 32767).astype(np.int16))
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
        truth = {"weights": W, "snr": ratio, "noise_sd": noise_sd, "kind": kind}
        for s in stories:
            clean = np.where(kind < 2, zscore(features[s] @ W), 0.0)  # (rows, voxels), unit variance
            truth[f"clean_{s}"], truth[f"features_{s}"] = clean, features[s]
            noisy = clean + noise_sd * rng.standard_normal((repeats if s == TEST_STORY else 1, *clean.shape))
            with h5py.File(os.path.join(out, "derivative", "preprocessed_data", subj, s + ".hf5"), "w") as f:
                f["data"] = zscore(noisy.mean(0)).astype(np.float32)
                if s == TEST_STORY:
                    f["individual_repeats"] = noisy.astype(np.float32)
        np.savez(os.path.join(out, "derivative", "rois", subj + ".npz"),
                 AC=np.flatnonzero(kind == 0), semantic=np.flatnonzero(kind == 1))
        np.savez(os.path.join(out, "derivative", "ground_truth", subj + ".npz"), **truth)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="braintune data tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="write a synthetic dataset in the ds003020 layout")
    d.add_argument("out", help="folder to write (must not exist yet)")
    d.add_argument("--subjects", type=int, default=3, help="number of subjects")
    d.add_argument("--stories", type=int, default=10, help="training stories (a test story is added)")
    d.add_argument("--voxels", type=int, default=500, help="voxels per subject")
    d.add_argument("--seconds", type=float, default=150.0, help="length of each story in seconds")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    if os.path.exists(a.out):
        sys.exit(f"error: {a.out} already exists; choose a new folder (nothing was written)")
    make_demo(a.out, a.subjects, a.stories, a.voxels, a.seed, a.seconds)
    print(f"wrote a synthetic dataset to {a.out}")


if __name__ == "__main__":
    main()
