"""
The cache: every file read once, every feature computed once, and nothing half-written trusted.

Responses (20 GB of float64 hf5 for a whole subject) and 44.1 kHz audio are converted once into
float32 .npy files that runs memory-map; features and stage-1 fits are kept under a key that covers
every input that changes them. An entry lives in <cache>/<kind>/<name>-<digest of its key>, is
written under a temporary name and renamed, and is read back only if its files have the sizes its
manifest records. $BRAINTUNE_CACHE sets the folder (default .cache); --no-cache keeps nothing.
"""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import dist
import guard


def log(msg):
    """A line of the run's log, from the first process only (torchrun starts one per device)."""
    if dist.RANK == 0:
        print(msg, flush=True)


def progress(items, desc, total=None, note=None, every=30.0):
    """tqdm on a terminal; elsewhere a plain line every `every` seconds (quick steps print nothing).
    note() -> str: shown after each item (a running loss, say)."""
    if dist.RANK:
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
            extra = f", {note()}" if note else ""
            print(f"{desc}: {i}/{total}, {last - t0:.0f} s{extra}", file=sys.stderr,
                  flush=True)


_PRIVATE = []  # the folder of an active no_cache()


def cache_root():
    """The cache's folder: $BRAINTUNE_CACHE (default .cache), or --no-cache's private one."""
    if _PRIVATE:
        return _PRIVATE[-1]
    return os.path.abspath(os.environ.get("BRAINTUNE_CACHE", ".cache"))


def check_root():
    """The cache's folder, one this process can write in (or make), checked before any work."""
    return guard.writable_folder(cache_root(), "$BRAINTUNE_CACHE (default .cache)")


@contextlib.contextmanager
def no_cache():
    """--no-cache: within it, entries go to a private folder, deleted at its end."""
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
    """The cache entry of `key`: build() -> {name: numpy array (saved as .npy, read back
    memory-mapped), dict of tensors (.pt) or JSON value}, made once in
    <cache>/<kind>/<name>-<digest>. It is written under a temporary name and renamed, and read back
    only if every file has the size its manifest says: a run killed while writing leaves nothing
    that a later run would trust. build None: only look (None if there is no entry)."""
    path = os.path.join(cache_root(), kind, f"{name}-{digest(key)}")
    if os.path.isdir(path):
        try:
            return _read_entry(path)
        except Exception as e:  # truncated, corrupt, or from an older layout
            warnings.warn(f"{path}: broken cache entry ({type(e).__name__}: {e}); rebuilding it")
            shutil.rmtree(path, ignore_errors=True)
    if build is None:
        return None
    remove_stale(path + ".tmp")  # left by a killed process: never read
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
            json.dump(manifest, f, default=described)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # else another process made the same entry first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_entry(path)


def remove_stale(prefix):
    """Remove the folders PREFIX<pid> whose process is no longer running (killed while writing)."""
    for old in glob.glob(glob.escape(prefix) + "*") if os.name == "posix" else []:
        try:
            os.kill(int(old[len(prefix):]), 0)  # signal 0: is the writer still running?
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError):
            pass


def described(x):
    """How a manifest writes a value JSON cannot hold (an array in a key): its type and shape."""
    return f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"


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


def read_json(path):
    """The JSON in file `path`, the file closed after."""
    with open(path) as f:
        return json.load(f)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a broken file behind. Text (a
    str: JSON, a script), arrays (.npz) or anything torch.save takes."""
    tmp = path + ".tmp"
    if isinstance(obj, str):
        with open(tmp, "w") as f:
            f.write(obj)
    elif path.endswith(".npz"):
        with open(tmp, "wb") as f:
            np.savez(f, **obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(path):
    """`with atomic_folder(out) as tmp:` fill the folder tmp (out.braintune-tmp<pid>, a name no
    user's folder has; those of killed processes are removed); it is renamed to out when the block
    ends, and removed if the block fails, so that a half-written folder never bears the name asked
    for."""
    tmp = f"{path.rstrip('/')}.braintune-tmp{os.getpid()}"
    remove_stale(path.rstrip("/") + ".braintune-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, path)


def merge_analyses(run, key, value):
    """RUN/analyses.json with `key` set to `value`, its other keys kept, written atomically."""
    path = os.path.join(run, "analyses.json")
    old = read_json(path) if os.path.exists(path) else {}
    old[key] = value
    save_atomic(json.dumps(old, indent=1), path)
