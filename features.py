"""
The features the ridge and the heads read, apart from the model that makes them: each training
window's frames pooled (model.Extractor.pooled), or a paper's evaluation protocol (a sliding context
ending every stride, Lanczos to the fMRI rows' times, delays), every story forwarded once and
cached under what it depends on.

    X = split_features(extractor, shared, 6, cpu, batch_size=16)  # {split: (rows, p)}: windows
    X = split_features(extractor, shared, 6, cpu, batch_size=16, protocol=Protocol("moussa2025",
                       5, 16.0, 0.1, [1, 2, 3, 4], 40))              # a paper's protocol
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
import dist
import ridge
from cache import cached, progress


# -----------------------------------------------------------------------------
# the training windows' features

@torch.inference_mode()
def window_features(fn, windows, key, device, *, batch_size, desc="features", precision="auto"):
    """fn(wave (batch, samples)) -> (batch, p) for every window, in order: (rows, p) float32 on the
    CPU. With a key (what fn computes: backbone, layer, ...), each story's block is cached under it
    and the story's audio, row count and timing, so a second run does not forward it again. With a
    list of keys, fn returns a list of (batch, p), one per key (several layers of one forward):
    each story's blocks are cached and nothing is returned, so that no caller holds every layer at
    once."""
    many = isinstance(key, list)

    def blocks(i):  # [(rows, p)] of story i, one per key
        out = []
        story = range(windows.starts[i], windows.starts[i + 1])
        cuda = device.type == "cuda"  # the windows sliced in workers, ahead of the GPU
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(windows, story), batch_size,
                                             num_workers=2 if cuda else 0, pin_memory=cuda)
        for wave, *_ in loader:
            with dist.autocast(device, precision):
                y = fn(wave.to(device, non_blocking=True))
            out.append([t.float().cpu() for t in (y if many else [y])])
        if not out:
            return [np.zeros((0, 0), np.float32)]
        return [torch.cat(c).numpy() for c in zip(*out)]
    out = []
    for i in progress(range(len(windows.stories)), desc):
        if key is None or windows.keys is None:  # nothing to cache under
            if not many:  # (many: nothing returned either)
                only, = blocks(i)  # the one (rows, p)
                out.append(torch.from_numpy(only))
            continue
        keys = [dict(k, audio=windows.keys[i], rows=len(windows.ends[i]),
                     precision=dist.precision_name(device, precision), **windows.timing)
                for k in (key if many else [key])]
        name = windows.stories[i]
        got = [cached("features", k, None, name) for k in keys]
        if any(g is None for g in got):  # one forward for every missing key
            got = [cached("features", k, functools.partial(dict, x=x), name)
                   for k, x in zip(keys, blocks(i))]
        if not many:
            out.append(torch.from_numpy(np.array(got[0]["x"])))
    return None if many else torch.cat(out)


# -----------------------------------------------------------------------------
# the papers' evaluation features: a sliding context, Lanczos to the TRs, FIR delays

PROTOCOLS = {  # what stage 1's baseline, the refit and eval's fits see; the training input stays
    "windows": dict(delays=(), test_skip=0),  # the windows
    "moussa2025": dict(context=16.0, stride=0.1, delays=(1, 2, 3, 4), test_skip=40),
    "brainwavlm": dict(context=3.75, stride=0.25, delays=(1, 2, 3, 4), test_skip=40),
}


@dataclass
class Protocol:
    """What stage 1's baseline, the refit and eval's fits are scored on (--protocol and its
    settings), as results.json records it."""
    name: str  # windows, moussa2025 or brainwavlm
    history: int  # TRs of audio in each training window (--history)
    context: float = None  # seconds heard before each stride (a paper's protocol only)
    stride: float = None  # seconds between the ends of the feature windows
    delays: list = ()  # TR delays of the features (finite impulse response)
    test_skip: int = 0  # rows left out of each test story's score at its start
    frame: str = "last"  # the frames kept of each snippet: its last stride's, or its first one

    @property
    def sliding(self):
        """A paper's sliding context, rather than the training windows."""
        return self.name != "windows"


def lanczos(x, old_times, new_times, tr, window=3):
    """x (old samples, p) at old_times resampled to new_times (s) by the Huth lab's Lanczos filter:
    weight sinc(t) sinc(t / window) for |t| <= window, t = (new time - old time) / tr, so the cutoff
    is the new rate's Nyquist frequency; two-sided, not normalised (z-scoring follows). (new, p)."""
    new, old = np.asarray(new_times, np.float64), np.asarray(old_times, np.float64)
    t = (new[:, None] - old[None, :]) / tr
    weights = np.sinc(t) * np.sinc(t / window) * (np.abs(t) <= window)
    return torch.as_tensor(weights, dtype=x.dtype) @ x


def delayed(x, delays):
    """(rows, p) -> (rows, len(delays) * p): row t holds rows t - d of x for each delay d, zeros
    before the story starts (the finite-impulse-response model)."""
    return torch.cat([F.pad(x, (0, 0, d, 0))[:len(x)] for d in delays], 1)


@torch.inference_mode()
def stride_frames(frames_fn, wave, hop, protocol, device, *, batch_size, precision="auto"):
    """Frame features of a whole story, each frame heard with protocol.context s of audio before
    its stride: the story cut into chunks of context + stride seconds ending every stride s, each
    forwarded once (in batches; zeros before the story starts and after it ends), the frames of its
    last stride kept, or with protocol.frame "first" its first frame alone, labelled at the
    snippet's end (BrainWavLM's code: the hidden state at the first token). frames_fn: (batch,
    samples) -> (batch, frames, dim); hop: samples per frame. Returns the frames' times (s) and
    features (frames, dim)."""
    n_ctx, n_str = round(protocol.context * data.SR), round(protocol.stride * data.SR)
    chunk = n_ctx + n_str
    ends = np.arange(n_str, len(wave) + n_str, n_str)  # chunk ends, in samples
    times, feats = [], []
    for i in range(0, len(ends), batch_size):
        waves = []
        for e in ends[i:i + batch_size]:
            w = np.array(wave[max(e - chunk, 0):min(e, len(wave))], np.float32)
            before = max(chunk - e, 0)  # zeros before the story starts
            waves.append(np.pad(w, (before, chunk - before - len(w))))
        with dist.autocast(device, precision):
            h = frames_fn(torch.from_numpy(np.stack(waves)).to(device))
        h = h.float().cpu()  # (batch, frames, dim)
        at = (np.arange(h.shape[1]) + 0.5) * hop  # each frame's centre, samples into the chunk
        if protocol.frame == "first":
            times.append(ends[i:i + len(waves)] / data.SR)  # (batch,) the snippets' ends
            feats.append(h[:, 0])
            continue
        keep = np.flatnonzero((at > chunk - n_str) & (at <= chunk))  # the chunk's last stride
        times.append((ends[i:i + len(waves), None] - chunk + at[keep]) / data.SR)
        feats.append(h[:, keep].reshape(-1, h.shape[2]))
    return np.concatenate(times).ravel(), torch.cat(feats)


def protocol_features(extractor, windows, protocol, device, *, batch_size, desc="features",
                      precision="auto"):
    """Each story's features under a paper's protocol (context, stride, delays), at its fMRI rows:
    stride_frames, Lanczos to the rows' times, z-scored per story, delayed. (rows, p), the
    resampled frames cached per story under the extractor's key and the protocol. extractor: an
    Extractor, or anything with its hidden(wave), hop and key() (None: not cached)."""
    key, timing = extractor.key(), windows.timing
    out = []
    for i in progress(range(len(windows.stories)), desc):
        t_rows = data.row_times(len(windows.ends[i]), timing["tr"], timing["trim_start"],
                                timing["sound_start"])

        def build():
            wave = windows.waves[i]
            times, x = stride_frames(extractor.hidden, wave, extractor.hop, protocol, device,
                                     batch_size=batch_size, precision=precision)
            return {"x": lanczos(x, times, t_rows, timing["tr"]).numpy()}
        if key is None or not windows.keys:
            x = build()["x"]
        else:
            k = dict(key, audio=windows.keys[i], rows=len(t_rows), context=protocol.context,
                     stride=protocol.stride, frame=protocol.frame, lanczos=3,
                     precision=dist.precision_name(device, precision), **timing)
            x = cached("protocol", k, build, windows.stories[i])["x"]
        x = torch.from_numpy(np.array(x))
        mu, sd = ridge.moments(x)  # z-scored per story
        out.append(delayed((x - mu) / sd, protocol.delays))
    return torch.cat(out)


def split_features(extractor, windows, history, device, *, batch_size, protocol=None,
                   precision="auto"):
    """{split: (rows, p)}: the features of the Windows in `windows` {split: Windows} that the ridge
    fits, cached: each window's frames pooled in `history` TR bins (Extractor.pooled), or, with a
    paper's protocol (a Protocol whose .sliding), each story forwarded in strides, Lanczos to the
    rows, delayed."""
    if protocol is not None and protocol.sliding:
        return {s: protocol_features(extractor, w, protocol, device, batch_size=batch_size,
                                     desc=s, precision=precision) for s, w in windows.items()}
    fn = functools.partial(extractor.pooled, history=history)
    key = extractor.key()
    return {s: window_features(fn, w, key, device, batch_size=batch_size, desc=s,
                               precision=precision) for s, w in windows.items()}


# -----------------------------------------------------------------------------
# the shared windows' features, and each subject's rows of them

@dataclass
class Features:
    """The features of the windows the subjects share, and each subject's rows of them."""
    shared: dict  # {split: (shared windows, p)}
    mu: torch.Tensor  # (p,) the first split's mean: one z-scoring for every head
    sd: torch.Tensor  # (p,)
    subjects: list  # [{split: (rows, p)}], one per subject (data.Subject)


def shared_features(extractor, ds, windows, history, *, batch_size, protocol=None,
                    precision="auto"):
    """Each of the shared `windows` {split: data.Windows} (or each story, under a paper's
    protocol) forwarded once on the extractor's device (split_features), z-scored by the first
    split's moments, and each subject of `ds` given its rows: Features."""
    device = next(extractor.parameters()).device
    X = split_features(extractor, windows, history, device, batch_size=batch_size,
                       protocol=protocol, precision=precision)
    mu, sd = ridge.moments(X[next(iter(windows))])
    return Features(X, mu, sd, [{s: rows_of(X[s], d.window_of[s]) for s in X} for d in ds])


def rows_of(x, window_of):
    """x[window_of], without a copy when it is every row in order (a subject who heard all)."""
    if len(window_of) == len(x) and bool((window_of == torch.arange(len(x))).all()):
        return x
    return x[window_of]
