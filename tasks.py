"""
The downstream tasks' datasets, each read from the folder a user downloads, in its published
layout (docs/evaluation.md), into a Task of labelled clips; downstream.py probes them.

    speechcommands   word identity: Speech Commands v0.01 / v0.02 (or torchaudio's folder above it)
    timit-phones     which of TIMIT's phonemes (61 folded to Lee & Hon's 39, less sil) it holds
    timit-sentence   the sentence type of a TIMIT utterance: SA, SX or SI
    cremad           emotion: CREMA-D's AudioWAV, split by actor
    fluent           intent, the (action, object, location) triple: Fluent Speech Commands

    task = read_task("cremad", root, limit=200)  # a folder in another layout: one ValueError
    python tasks.py words DATA OUT    # a dataset's words cut into a Speech Commands folder
"""
import csv
import glob
import itertools
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional as AF
from scipy.io import wavfile

import data
import guard
import textgrid
from cache import atomic_folder, progress

TASKS = ("speechcommands", "timit-phones", "timit-sentence", "cremad", "fluent")
EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
TIMIT61 = ("aa ae ah ao aw ax ax-h axr ay b bcl ch d dcl dh dx eh el em en eng epi er ey f g gcl "
           "h# hh hv ih ix iy jh k kcl l m n ng nx ow oy p pau pcl q r s sh t tcl th uh uw ux v w "
           "y z zh").split()
FOLDED = {"ao": "aa", "ax": "ah", "ax-h": "ah", "axr": "er", "hv": "hh", "ix": "ih", "el": "l",
          "em": "m", "en": "n", "nx": "n", "eng": "ng", "zh": "sh", "ux": "uw", "q": None,
          **{p: "sil" for p in "bcl dcl gcl pcl tcl kcl h# pau epi".split()}}
TIMIT39 = {p: FOLDED.get(p, p) for p in TIMIT61}  # Lee & Hon 1989; q is dropped (None)
PHONES39 = sorted({p for p in TIMIT39.values() if p})  # the 39, sil included


@dataclass
class Clip:
    path: str  # the audio file
    label: object  # class index (int), or for a multi-label task a sorted list of class indices


@dataclass
class Task:
    name: str
    classes: list  # (classes,) class names
    multilabel: bool
    splits: dict  # {"train" | "valid" | "test": [Clip]}


# -----------------------------------------------------------------------------
# the readers: each task's folder in its published layout

def _listdir(d):
    return sorted(os.listdir(d)) if d and os.path.isdir(d) else []


def _child(d, name):  # the entry of folder d called `name`, in any case, or None
    return next((os.path.join(d, x) for x in _listdir(d) if x.lower() == name.lower()), None)


def _draw(keys, n_valid, n_test, seed):
    """Sorted keys (speakers, actors) in a seeded order, cut into {"train", "valid", "test"}
    sets."""
    order = [sorted(keys)[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    return dict(train=set(order[n_valid + n_test:]), valid=set(order[:n_valid]),
                test=set(order[n_valid:n_valid + n_test]))


def read_speechcommands(root):
    """Speech Commands v0.01 / v0.02: <word>/<speaker>_nohash_<n>.wav, validation_list.txt and
    testing_list.txt (paths relative to the root), training every other clip; _background_noise_
    is left out. root may also be torchaudio's folder above (SpeechCommands/speech_commands_v0.02).
    Classes are the word folders found."""
    up = [os.path.join(root, p, "speech_commands_v0.0*") for p in ("", "SpeechCommands")]
    found = [d for d in [root, *sorted(glob.glob(up[0])), *sorted(glob.glob(up[1]))]
             if glob.glob(os.path.join(d, "[!_]*", "*_nohash_*.wav"))]
    if not found:
        raise ValueError(f"{root}: not a Speech Commands folder (expected <word>/<speaker>_nohash_"
                         "<n>.wav, or torchaudio's SpeechCommands/speech_commands_v0.02/ above it)")
    root = found[0]
    classes = [w for w in _listdir(root) if os.path.isdir(os.path.join(root, w)) and w[0] != "_"]
    index = {w: i for i, w in enumerate(classes)}
    listed = {}
    for split, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing; Speech Commands lists its {split} clips there")
        listed[split] = [line.strip() for line in open(path) if line.strip()]
        bad = next((r for r in listed[split] if r.split("/")[0] not in index), None)
        if bad:
            raise ValueError(f"{path}: {bad} names a word with no folder in {root}; expected one "
                             f"of {', '.join(classes)}")
    held = set(listed["valid"]) | set(listed["test"])
    train = [f"{w}/{f}" for w in classes for f in _listdir(os.path.join(root, w))
             if f.endswith(".wav") and f"{w}/{f}" not in held]
    splits = {s: [Clip(os.path.join(root, r), index[r.split("/")[0]]) for r in rel]
              for s, rel in (("train", train), *listed.items())}
    return Task("speechcommands", classes, False, splits)


def _timit_label(folder, utt, path, kind, index):
    if kind == "sentence":
        if utt[:2] not in index:
            raise ValueError(f"{path}: the utterance name {utt} starts with none of SA, SX, SI")
        return index[utt[:2]]
    phn = _child(folder, utt + ".PHN")
    if phn is None:
        raise ValueError(f"{os.path.join(folder, utt)}.PHN: missing; timit-phones reads each "
                         "utterance's phones from it")
    found = set()
    for i, line in enumerate(open(phn, errors="replace"), 1):
        parts = line.split()
        if len(parts) != 3 or parts[2] not in TIMIT39:
            raise ValueError(f"{phn}: line {i} is not 'start end phone' with one of TIMIT's 61 "
                             f"phones ({line.strip()!r})")
        found.add(TIMIT39[parts[2]])
    return sorted(index[p] for p in found if p in index)


def read_timit(root, kind, seed=0):
    """TIMIT as LDC ships it (TRAIN|TEST/DR*/<speaker>/<utt>.WAV in NIST SPHERE, with <utt>.PHN), or
    a copy with RIFF files (SA1.WAV.wav) or lower-case paths; root may also hold TIMIT/ or data/
    above TRAIN and TEST. kind "phones": the set of folded phonemes an utterance holds, multi-label
    over the 39 LESS sil (38 classes): sil (closures, pauses, h#) is in every utterance, a constant
    label that would only add free true positives (Moussa et al.'s eval_phonemes.py also drops it,
    as h#). kind "sentence": SA, SX or SI, from the name.
    TEST is the test split; a seeded tenth of TRAIN's speakers (whole speakers, at least one) is
    the validation split, the rest of TRAIN the training split."""
    base = next((d for d in (root, _child(root, "TIMIT"), _child(root, "data"))
                 if _child(d, "TRAIN") and _child(d, "TEST")), None)
    if base is None:
        raise ValueError(f"{root}: not a TIMIT folder (expected TRAIN/ and TEST/ holding "
                         "DR*/<speaker>/<utt>.WAV)")
    classes = [p for p in PHONES39 if p != "sil"] if kind == "phones" else ["SA", "SX", "SI"]
    index = {c: i for i, c in enumerate(classes)}
    speakers = {}  # (part, region, speaker) -> [Clip]
    for part in ("TRAIN", "TEST"):
        top = _child(base, part)
        for region, spk in ((r, s) for r in _listdir(top) for s in _listdir(os.path.join(top, r))):
            folder = os.path.join(top, region, spk)
            audio = {}  # utterance -> its audio file (SA1.WAV before SA1.WAV.wav)
            for f in _listdir(folder):
                if f.lower().endswith(".wav"):
                    audio.setdefault(f.split(".")[0].upper(), os.path.join(folder, f))
            speakers[part, region, spk] = [Clip(p, _timit_label(folder, u, p, kind, index))
                                           for u, p in audio.items()]
    train = [k for k in speakers if k[0] == "TRAIN" and speakers[k]]
    if len(train) < 2:
        raise ValueError(f"{_child(base, 'TRAIN')}: needs utterances of at least 2 speakers")
    drawn = _draw(train, max(1, round(len(train) / 10)), 0, seed)
    drawn["test"] = [k for k in speakers if k[0] == "TEST"]
    splits = {s: [c for k in sorted(keys) for c in speakers[k]] for s, keys in drawn.items()}
    return Task(f"timit-{kind}", classes, kind == "phones", splits)


def read_cremad(root, seed=0):
    """CREMA-D: AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav, emotions ANG DIS FEA HAP NEU SAD.
    Split by actor, seeded: a tenth of the actors (at least one) validation, a tenth test, the rest
    training, so that no voice is in two splits."""
    folder = _child(root, "AudioWAV") or root
    actors = {}
    for f in (f for f in _listdir(folder) if f.lower().endswith(".wav")):
        path, parts = os.path.join(folder, f), f[:-4].split("_")
        if len(parts) != 4:
            raise ValueError(f"{path}: not named <actor>_<sentence>_<emotion>_<level>.wav")
        if parts[2] not in EMOTIONS:
            raise ValueError(f"{path}: emotion {parts[2]} is not one of {' '.join(EMOTIONS)}")
        actors.setdefault(parts[0], []).append(Clip(path, EMOTIONS.index(parts[2])))
    if len(actors) < 3:
        raise ValueError(f"{root}: not a CREMA-D folder of 3 actors or more (expected AudioWAV/"
                         "<actor>_<sentence>_<emotion>_<level>.wav)")
    n = max(1, round(len(actors) / 10))
    parts = _draw(list(actors), n, n, seed)
    splits = {s: [c for a in sorted(parts[s]) for c in actors[a]] for s in parts}
    return Task("cremad", list(EMOTIONS), False, splits)


def read_fluent(root):
    """Fluent Speech Commands: data/{train,valid,test}_data.csv (an index, path, speakerId,
    transcription, action, object, location; path relative to the dataset root). The class is
    the intent, the (action, object, location) triple written 'action/object/location', as
    SUPERB's IC scores it; the classes are the training split's intents."""
    base = next((d for d in (root, os.path.join(root, "fluent_speech_commands_dataset"))
                 if os.path.isdir(os.path.join(d, "data"))), None)
    if base is None:
        raise ValueError(f"{root}: not a Fluent Speech Commands folder (expected data/"
                         "train_data.csv, valid_data.csv and test_data.csv)")
    splits, index = {}, {}
    for split in ("train", "valid", "test"):
        path = os.path.join(base, "data", f"{split}_data.csv")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing; Fluent Speech Commands lists its {split} clips "
                             "there")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "action", "object", "location"} <= set(rows[0]):
            raise ValueError(f"{path}: expected a header with path, speakerId, transcription, "
                             "action, object, location and at least one row")
        intents = ["/".join((r["action"], r["object"], r["location"])) for r in rows]
        if split == "train":
            index = {c: i for i, c in enumerate(sorted(set(intents)))}
        bad = next((i for i in intents if i not in index), None)
        if bad:
            raise ValueError(f"{path}: intent {bad} never occurs in train_data.csv; expected one "
                             f"of its {len(index)} intents")
        splits[split] = [Clip(os.path.join(base, r["path"]), index[i])
                         for r, i in zip(rows, intents)]
    return Task("fluent", list(index), False, splits)


def limit_clips(clips, limit, seed=0):
    """The first `limit` clips in a seeded order that takes each class in turn (by its first label),
    so that a quick look still covers the classes; every clip with limit None."""
    if limit is None or limit >= len(clips):
        return clips
    groups = {}
    for i in np.random.default_rng(seed).permutation(len(clips)):
        label = clips[i].label
        first = label if isinstance(label, int) else tuple(label[:1])
        groups.setdefault(first, []).append(clips[i])
    rounds = itertools.zip_longest(*groups.values())
    return [c for r in rounds for c in r if c is not None][:limit]


def read_task(name, root, limit=None, seed=0):
    """The Task `name` (TASKS) read from root, the first `limit` clips of each split (limit_clips),
    every listed audio file checked to exist and hold data: bad input fails before any forward."""
    if name not in TASKS:
        raise ValueError(f"--downstream {name}: unknown task; choose one of {', '.join(TASKS)}")
    if not os.path.isdir(root):
        raise ValueError(f"{root}: no such folder; expected the {name} dataset's folder")
    if limit is not None and limit < 1:
        raise ValueError(f"--downstream-limit {limit}: expected a positive number of clips")
    if name == "speechcommands":
        task = read_speechcommands(root)
    elif name.startswith("timit-"):
        task = read_timit(root, name[6:], seed)
    else:
        task = read_cremad(root, seed) if name == "cremad" else read_fluent(root)
    task.splits = {s: limit_clips(c, limit, seed) for s, c in task.splits.items()}
    for split, clips in task.splits.items():
        if not clips:
            raise ValueError(f"{root}: the {split} split of {name} holds no clips")
        for c in clips:
            if not os.path.isfile(c.path) or os.path.getsize(c.path) == 0:
                what = "empty" if os.path.isfile(c.path) else "missing"
                raise ValueError(f"{c.path}: {what}; {name} lists it in its {split} split")
    return task


# -----------------------------------------------------------------------------
# the audio

def read_sphere_or_wav(path):
    """A NIST SPHERE file (TIMIT's .WAV: an ASCII header starting NIST_1A, its size on the second
    line, then 16-bit PCM) or a RIFF WAV file, whichever its first bytes say -> (samples,) float32
    at 16 kHz (several channels averaged)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if head[:4] == b"RIFF":
        return data.read_wav(path)
    if head[:7] != b"NIST_1A":
        raise ValueError(f"{path}: neither NIST SPHERE (NIST_1A) nor RIFF WAV audio")
    raw = open(path, "rb").read()
    lines = raw[:4096].decode("ascii", "replace").split("\n")
    try:
        size = int(lines[1])
        fields = dict(ln.split(None, 2)[::2] for ln in lines[2:] if len(ln.split(None, 2)) == 3)
        rate, channels = int(fields.get("sample_rate", 16000)), int(fields.get("channel_count", 1))
    except (IndexError, ValueError):
        raise ValueError(f"{path}: a NIST SPHERE header that cannot be parsed") from None
    order = {"01": "<i2", "10": ">i2"}.get(fields.get("sample_byte_format", "01").strip())
    coding = fields.get("sample_coding", "pcm").strip()
    if order is None or fields.get("sample_n_bytes", "2").strip() != "2" or coding != "pcm":
        raise ValueError(f"{path}: expected uncompressed 16-bit PCM (sample_byte_format 01 or 10)")
    pcm = np.frombuffer(raw[size:size + (len(raw) - size) // (2 * channels) * 2 * channels], order)
    if pcm.size == 0:
        raise ValueError(f"{path}: a NIST SPHERE file with no samples")
    mono = torch.from_numpy(pcm.reshape(-1, channels).mean(1, dtype=np.float32) / 2 ** 15)
    return AF.resample(mono, rate, data.SR) if rate != data.SR else mono


# -----------------------------------------------------------------------------
# a ds003020-layout dataset's words as a Speech Commands folder

def words_to_speechcommands(data_root, out, *, valid_story=None, test_story=data.TEST_STORY,
                            seconds=1.0):
    """Every word of every story (textgrid.read_words) cut from its wav into a `seconds` clip,
    the word centred and zero-padded (longer words cut to their middle), written as
    16 kHz int16 <word>/<story>_nohash_<n>.wav. Splits by story, as stories have their own voice:
    test_story's words are the testing list, valid_story's (default: the last other story) the
    validation list, the rest training; words that no training story holds are left out. The
    clips' disk is checked before the first is cut."""
    if not os.path.isdir(data_root):
        what = "not a folder" if os.path.exists(data_root) else "no such folder"
        raise ValueError(f"{data_root}: {what}; expected a dataset in ds003020's layout")
    stimuli = [f[:-4] for f in _listdir(os.path.join(data_root, "stimuli")) if f.endswith(".wav")]
    stories = [s for s in stimuli if os.path.isfile(data.textgrid_path(data_root, s))]
    if test_story not in stories:
        raise ValueError(f"{data.wav_path(data_root, test_story)}: missing, or without a TextGrid; "
                         "the test story's words make the testing list")
    valid_story = valid_story or [s for s in stories if s != test_story][-1]
    if valid_story not in stories or valid_story == test_story or len(stories) < 3:
        raise ValueError(f"--valid-story {valid_story}: expected another story of {data_root} "
                         f"than the test story, and at least one more for training")
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out}: exists and is not empty; choose a new folder")

    def words(story):  # [(start, end, folder name)]
        got = textgrid.read_words(data.textgrid_path(data_root, story))
        names = [(a, b, re.sub(r"[^a-z0-9'_-]", "", w.lower()).lstrip("_")) for a, b, w in got]
        return [(a, b, w) for a, b, w in names if w]
    told = {s: words(s) for s in stories}
    trained = {w for s in stories if s not in (valid_story, test_story) for _, _, w in told[s]}
    n, lists, count = round(seconds * data.SR), {valid_story: [], test_story: []}, {}
    clips = sum(w in trained for s in stories for _, _, w in told[s])
    # int16 samples and a 44-byte header each
    guard.fits_on_disk(clips * (2 * n + 44), out, f"{clips} clips of {seconds:g} s", "--seconds")
    os.makedirs(out, exist_ok=True)
    for story in progress(stories, "cutting words"):
        wave = data.read_wav(data.wav_path(data_root, story)).numpy()
        for a, b, word in told[story]:
            piece = wave[round(a * data.SR):round(b * data.SR)]
            if word not in trained or not len(piece):
                continue
            cut = piece[max(0, (len(piece) - n) // 2):][:n]
            clip = np.pad(cut, ((n - len(cut)) // 2, n - len(cut) - (n - len(cut)) // 2))
            count[word, story] = count.get((word, story), -1) + 1
            rel = f"{word}/{story}_nohash_{count[word, story]}.wav"
            os.makedirs(os.path.join(out, word), exist_ok=True)
            pcm = np.round(np.clip(clip, -1, 1) * 32767).astype(np.int16)
            wavfile.write(os.path.join(out, rel), data.SR, pcm)
            if story in lists:
                lists[story].append(rel)
    for story, name in ((valid_story, "validation_list.txt"), (test_story, "testing_list.txt")):
        with open(os.path.join(out, name), "w") as f:
            f.writelines(r + "\n" for r in lists[story])
    return out


def parser():
    p = guard.Parser(description="the downstream tasks' datasets: helpers")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("words", help="cut a ds003020-layout dataset's words into a Speech Commands "
                                     "folder (splits by story)")
    w.add_argument("data", help="the dataset (stimuli/*.wav, derivative/TextGrids/*.TextGrid)")
    w.add_argument("out", help="folder to write (must not exist yet, or be empty)")
    w.add_argument("--valid-story", help="the story whose words are the validation list "
                                         "(default: the last story other than the test story)")
    w.add_argument("--test-story", default=data.TEST_STORY, help="the story of the testing list")
    # 25 ms: the backbones' CNN front end needs 400 samples for a frame; past 10 s (a word, centred
    # and zero-padded), a clip is all silence
    w.add_argument("--seconds", type=guard.number(float, low=0.025, high=10), default=1.0,
                   help="length of each clip in seconds")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    guard.new_path(a.out, "", folder=True)
    with atomic_folder(a.out) as tmp:  # a killed run leaves no half folder under a.out
        words_to_speechcommands(a.data, tmp, valid_story=a.valid_story, test_story=a.test_story,
                                seconds=a.seconds)
    print(f"wrote {a.out}: {len(read_speechcommands(a.out).classes)} words")


if __name__ == "__main__":
    guard.main_guard(main, kept="nothing was written (the half-made folder was removed)")
