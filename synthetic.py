"""
The synthetic dataset: speech-like audio, and responses with a known ground truth, written in
ds003020's layout (data.py reads it as it reads the real one), so that everything runs on a laptop.

Each story is a random sequence of consonant-vowel words; each subject's voxels respond, through a
haemodynamic response, to the words' meaning (embedding dimensions) or to the sound (band energies).

    python synthetic.py OUT [--subjects 3 --stories 15 --voxels 500 --seed 0]
    # full size
    python synthetic.py OUT --sr 44100 --channels 2 --stories 83 --seconds 650 --voxels 95556
"""
import os
from dataclasses import dataclass

import h5py
import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from scipy.stats import gamma

import guard
from cache import atomic_folder, progress
from data import (SOUND_START, TEST_STORY, TR, TRAIN_STORIES, TRIM_START, response_path,
                  row_times, textgrid_path, wav_path, zscore, zscore_)
# the quick start's dataset, under the cache; v2: TextGrids with braces and stress; v3: 15
# stories, SNR 1 to 10 (enough signal for 7 epochs on a laptop to show the effect)
SYNTHETIC = "synthetic-v3"
DEMO_SR = 22050  # not 16 kHz, so that the reader's resampling is exercised
# noise centre, Hz
CONSONANTS = {"K": 1800, "T": 4200, "P": 700, "S": 6000, "SH": 3000, "F": 7000, "HH": 1200}
VOWELS = {"AA": (730, 1090), "IY": (270, 2290), "UW": (300, 870), "EH": (530, 1840),
          "AO": (570, 840),
          "AE": (660, 1720)}  # formants F1, F2, Hz
GRID = 10  # Hz: the time grid on which the true features live before the haemodynamic response


def _burst(rng, centre, n):  # a consonant: noise in a band around `centre`
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / DEMO_SR)
    band = np.exp(-0.5 * ((f - centre) / (0.15 * centre)) ** 2)
    return np.fft.irfft(spec * band, n) * np.hanning(n)


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
    bands = [power[:, (f >= a) & (f < b)].sum(1) for a, b in zip(edges, edges[1:])]
    return np.log(1e-3 + np.stack(bands, 1))


def hrf(t):
    """The canonical double-gamma haemodynamic response (SPM): peak near 5 s, undershoot near 15 s.
    """
    return gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6


def _textgrid(path, words, seconds):
    """Praat's long text format: tier 1 'phone', tier 2 'word'; pauses are 'sp', every fifth a
    breath '{BR}', and vowels carry stress digits (1 in a word's first syllable, else 0), as in
    ds003020."""
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
            lines += [f"        intervals [{i}]:", f"            xmin = {a}",
                      f"            xmax = {b}",
                      f'            text = "{label}"']
        return lines
    phones = [(p + ("1" if i == 1 else "0") if p in VOWELS else p, a, b)
              for w in words for i, (p, a, b) in enumerate(w[3])]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0",
             f"xmax = {seconds}",
             "tiers? <exists>", "size = 2", "item []:", "    item [1]:", *tier("phone", phones),
             "    item [2]:", *tier("word", [w[:3] for w in words])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_demo(out, n_subjects=3, n_stories=15, n_voxels=500, seed=0, seconds=150.0, *, n_vocab=40,
              dim=16, repeats=10, tr=TR, snr=(1.0, 10.0), sr=DEMO_SR, channels=1):
    """Write a synthetic dataset in the ds003020 layout, stored as the real one is (float64 hf5).
    Voxels are of three kinds: 'AC' voxels respond to band energies, 'semantic' voxels to the
    meaning vectors of the words being spoken, the rest to nothing; each sees its features through
    the canonical HRF, plus Gaussian noise at a signal-to-noise ratio drawn log-uniformly from
    `snr`. Subjects share the feature spaces, with their own weights. The ground truth keeps each
    story's features and each subject's weights (clean responses: zscore(features @ weights)); one
    story's responses are in memory at a time, so a subject of the published size is written in < 2
    GB."""
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
    t_rows = row_times(story_rows(seconds, tr), tr)
    features = {s: _write_story(out, rng, s, vocab, emb, seconds, t_rows=t_rows, sr=sr,
                                channels=channels)  # (rows, 8 + dim) each
                for s in progress(stories, "synthetic audio")}
    for j in range(n_subjects):
        _write_subject(out, rng, f"UTS{j + 1:02d}", features, n_voxels, snr=snr, repeats=repeats)
    return out


def story_rows(seconds, tr=TR):
    """The rows (TRs) of a story of `seconds`: the last one inside the audio, less the trimmed."""
    return int((seconds + SOUND_START - tr / 2) / tr) - TRIM_START


@dataclass
class Footprint:  # what make_demo needs, in bytes
    memory: float  # held at once
    disk: float  # written


def footprint(n_subjects, n_stories, n_voxels, seconds, *, sr, channels, repeats=10, dim=16):
    """What make_demo holds at once and writes. The memory is the larger of two phases: a story's
    audio (28 bytes per sample at DEMO_SR; while it is resampled and stacked, 16 per DEMO_SR sample
    and 3 + 4 per channel per sample at `sr`), or a subject's story (4.2 float64 (rows, voxels)
    arrays: clean, noise, sum and temporaries, and 320 bytes per voxel: weights, SNR, truth); the
    stories' true features are held throughout. Fitted to make_demo's peak resident memory above
    the imports (ru_maxrss after, less before) at 1-2 subjects, 2 stories, 500-200,000 voxels,
    150-2,400 s, 22,050-176,400 Hz and 1-8 channels: 4% under to 15% over in each of 12 runs, the
    disk within 3%."""
    rows = story_rows(seconds)
    features = (n_stories + 1) * rows * (8 + dim) * 8
    story = seconds * max(28 * DEMO_SR, 16 * DEMO_SR + (3 + 4 * channels) * sr)
    subject = 4.2 * rows * n_voxels * 8 + 320 * n_voxels
    responses = n_subjects * (n_stories + 1 + repeats) * rows * n_voxels * 8  # float64 hf5
    audio = (n_stories + 1) * seconds * sr * channels * 2  # int16 wav
    return Footprint(memory=features + max(story, subject),
                     disk=responses + audio + n_subjects * (features + 320 * n_voxels))


def _write_story(out, rng, s, vocab, emb, seconds, *, t_rows, sr, channels):
    """Story s's wav and TextGrid; returns its true features at the rows' times (rows, 8 + dim):
    band energies and the spoken word's meaning vector, through the HRF, z-scored."""
    audio, words = _story(rng, vocab, seconds)
    pcm = audio / np.abs(audio).max() * 0.9 * 32767
    if sr != DEMO_SR:
        pcm = resample_poly(pcm.astype(np.float32), sr, DEMO_SR)
    pcm = pcm.astype(np.int16)
    if channels > 1:  # the other channels a little quieter
        pcm = np.stack([(pcm.astype(np.int32) * (5 - c) // 5).astype(np.int16)
                        for c in range(channels)], 1)
    wavfile.write(wav_path(out, s), sr, pcm)
    _textgrid(textgrid_path(out, s), words, seconds)
    low = zscore(_band_energies(audio))
    sem = np.zeros((len(low), len(next(iter(emb.values())))))
    for w, a, b, _ in words:
        sem[int(a * GRID):int(b * GRID) + 1] += emb[w]
    x = np.concatenate([low, sem], 1)
    k = np.arange(0, 32, 1 / GRID)
    x = np.stack([np.convolve(col, hrf(k))[: len(x)] / GRID for col in x.T], 1)
    return zscore(x[np.round(t_rows * GRID).astype(int)])


def _write_subject(out, rng, subj, features, n_voxels, *, snr, repeats):
    """One subject's responses to every story (hf5, the test story with its repeats), ROIs and
    ground truth: a third of the voxels AC, a third semantic, a third nothing, each at its own SNR.
    """
    os.makedirs(os.path.join(out, "derivative", "preprocessed_data", subj), exist_ok=True)
    p = next(iter(features.values())).shape[1]  # 8 band energies + the meaning's dimensions
    kind = rng.permutation(np.arange(n_voxels) * 3 // n_voxels)  # 0 AC, 1 semantic, 2 neither
    W = rng.standard_normal((p, n_voxels))
    W[8:, kind == 0] = 0
    W[:8, kind == 1] = 0
    W[:, kind == 2] = 0
    ratio = np.where(kind < 2, np.exp(rng.uniform(*np.log(snr), n_voxels)), 0.0)
    noise_sd = np.where(kind < 2, 1 / np.sqrt(np.maximum(ratio, 1e-12)), 1.0)
    truth = {"weights": W, "snr": ratio, "noise_sd": noise_sd, "kind": kind,
             **{f"features_{s}": x for s, x in features.items()}}
    for s in progress(list(features), f"synthetic {subj}"):
        clean = features[s] @ W  # (rows, voxels); in place from here on: a story is ~200 MB
        zscore_(clean)  # unit variance; voxels of neither kind have zero weights, so stay 0
        total = np.zeros_like(clean)
        with h5py.File(response_path(out, subj, s), "w") as f:
            # repeat by repeat: one repeat in memory at a time
            n = repeats if s == TEST_STORY else 1
            reps = None
            if n > 1:
                reps = f.create_dataset("individual_repeats", (n, *clean.shape), np.float64)
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


def parser():
    p = guard.Parser(description="write a synthetic dataset in the ds003020 layout")
    a = p.add_argument
    a("out", help="folder to write (must not exist yet, or be empty)")
    a("--subjects", type=guard.number(int, low=1), default=3, help="number of subjects")
    a("--stories", type=guard.number(int, low=2), default=15,
      help="training stories (a test story is added)")
    a("--voxels", type=guard.number(int, low=3), default=500, help="voxels per subject")
    # 30 s: 9 rows after the TRIM_START TRs that the hf5 files drop
    a("--seconds", type=guard.number(float, low=30), default=150.0,
      help="length of each story in seconds")
    a("--sr", type=guard.number(int, low=8000, high=384000), default=DEMO_SR,
      help="sample rate of the wav files (ds003020: 44100)")
    a("--channels", type=guard.number(int, low=1, high=8), default=1,
      help="channels of the wav files (ds003020: 2)")
    a("--seed", type=guard.number(int, low=0), default=0, help="random seed")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    guard.new_path(a.out, "", folder=True)
    need = footprint(a.subjects, a.stories, a.voxels, a.seconds, sr=a.sr, channels=a.channels)
    guard.fits_in_memory(need.memory, "the synthetic dataset",
                         "--voxels, --seconds, --stories, --sr or --channels")
    guard.fits_on_disk(need.disk, a.out, "the synthetic dataset",
                       "--subjects, --stories, --voxels, --seconds, --sr or --channels")
    with atomic_folder(a.out) as tmp:  # a killed run leaves no half dataset under a.out
        make_demo(tmp, a.subjects, a.stories, a.voxels, a.seed, a.seconds, sr=a.sr,
                  channels=a.channels)
    print(f"wrote a synthetic dataset to {a.out}")


if __name__ == "__main__":
    guard.main_guard(main, kept="nothing was written (the half-made folder was removed)")
