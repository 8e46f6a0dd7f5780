"""
Fetch the real dataset: exactly what braintune reads of OpenNeuro ds003020 (LeBel et al. 2023),
pinned to version 2.2.0 by the shipped ds003020-v2.2.0-manifest.json (each file's versioned
address). Resumable: a file is downloaded to <name>.part, resumed with an HTTP Range, checked
against the size the server announces, then renamed.

    python fetch.py ds003020 --subject UTS01 [--pycortex] [--out DIR] [--base-url MIRROR]
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request

from tqdm import tqdm

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

    resume = lambda: f"{done()} of {len(paths)} files are complete, run the same command again to resume"

    def failed(p, e):  # the one line for a network or server error
        if isinstance(e, urllib.error.HTTPError):
            return ValueError(f"{p}: HTTP {e.code} {e.reason} from {url(p).split('?')[0]}")
        return ValueError(f"cannot reach {base} ({getattr(e, 'reason', e)}); {resume()}")

    def size(p):  # the server's Content-Length
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
    clock = [time.time(), time.time()]  # start, last progress line
    for i, p in enumerate(todo):
        get(url(p), out, p, sizes[p], overall, clock, f"{i} of {len(todo)} files", lambda e: failed(p, e), resume)
    overall.close()
    print(f"{done()} of {len(paths)} files complete in {out}", flush=True)
    return paths


def get(url, out, name, size, overall, clock, where, failed, resume):
    """File `name` into out: to <name>.part, resumed by an HTTP Range request where a part exists,
    checked against the announced size, then renamed. failed(error) -> the error to raise for a
    network failure; resume() -> how to resume, for a transfer cut short."""
    path = os.path.join(out, name)
    part = path + ".part"
    os.makedirs(os.path.dirname(part), exist_ok=True)
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have >= size:  # complete but not renamed (killed in between), or not this file
        os.replace(part, path) if have == size else os.remove(part)
        if have == size:
            return
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    one = tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path), leave=False,
               disable=overall.disable)
    try:
        with urllib.request.urlopen(request, timeout=60) as r, open(part, "ab" if r.status == 206 else "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                overall.update(len(chunk))
                one.update(len(chunk))
                if not sys.stderr.isatty() and time.time() - clock[1] > 30:
                    clock[1] = time.time()
                    print(f"fetched {overall.n / 1e9:.2f} of {overall.total / 1e9:.2f} GB, {where}, "
                          f"{clock[1] - clock[0]:.0f} s", file=sys.stderr, flush=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        raise failed(e) from None
    except OSError as e:
        raise ValueError(f"{part}: cannot write ({e.strerror}); free some space and run the same command "
                         "again to resume") from None
    finally:
        one.close()
    got = os.path.getsize(part)
    if got < size:  # the connection dropped
        raise ValueError(f"{name}: the transfer stopped at {got} of {size} bytes; {resume()}")
    if got > size:
        os.remove(part)
        raise ValueError(f"{name}: {got} bytes arrived where the server announced {size}; not kept")
    os.replace(part, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="download what braintune reads of OpenNeuro ds003020 2.2.0")
    p.add_argument("dataset", choices=["ds003020"], help="the dataset (ds003020, the only one)")
    p.add_argument("--out", default=None, help="folder to fetch into (default: ./ds003020)")
    p.add_argument("--subject", default="UTS01", help="subjects, comma-separated (UTS01..UTS08; S01 works too)")
    p.add_argument("--pycortex", action="store_true", help="also their pycortex database (ROIs, flatmaps)")
    p.add_argument("--base-url", default=None, help=f"a mirror of {OPENNEURO} (or $BRAINTUNE_MIRROR)")
    a = p.parse_args(argv)
    try:
        fetch(a.out or a.dataset, a.subject.split(","), a.pycortex, base_url=a.base_url)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the files under their real names are complete: run the same command again to resume")


if __name__ == "__main__":
    main()
