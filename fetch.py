"""
Fetch the real dataset: exactly what braintune reads of OpenNeuro ds003020 (LeBel et al. 2023),
pinned to version 2.2.0 by the shipped ds003020-v2.2.0-manifest.json (each file's versioned
address). Resumable: a file is downloaded to <name>.part, resumed with an HTTP Range, checked
against the size the server announces, then renamed.

    python fetch.py ds003020 --subject UTS01 [--pycortex] [--out DIR] [--base-url MIRROR]
"""
import concurrent.futures
import functools
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

import guard

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds003020-v2.2.0-manifest.json")
# every address in the manifest starts so
OPENNEURO = "https://s3.amazonaws.com/openneuro.org/ds003020"
REAL_SUBJECTS = [f"UTS0{i}" for i in range(1, 9)]


def address(text):
    """A server's address, as --base-url and $BRAINTUNE_MIRROR give it: http(s)://HOST[/PATH]."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// address such as {OPENNEURO} (got "
                         f"{text!r})")
    return text.rstrip("/")


def fetch_list(manifest, subjects, pycortex=False):
    """The manifest's paths that braintune reads for these subjects: their responses, the audio and
    TextGrids of the stories they heard, the English1000 word vectors, and (pycortex) their pycortex
    database. Nothing else."""
    wanted = {"derivative/english1000sm.hf5"}
    for s in subjects:
        folder = f"derivative/preprocessed_data/{s}/"
        stories = [p.rsplit("/", 1)[1][:-4] for p in manifest if p.startswith(folder)]
        wanted |= {f"derivative/preprocessed_data/{s}/{t}.hf5" for t in stories}
        wanted |= {f"stimuli/{t}.wav" for t in stories}
        wanted |= {f"derivative/TextGrids/{t}.TextGrid" for t in stories}
        wanted |= {p for p in manifest if pycortex and p.startswith(f"derivative/pycortex-db/{s}/")}
    return sorted(p for p in wanted if p in manifest)


@dataclass
class Download:
    """One fetch: where its files come from and go, and its progress."""
    out: str  # the dataset folder
    base: str  # the server (OpenNeuro's, or a mirror)
    manifest: dict  # {path: address}
    paths: list  # what this fetch gets
    overall: tqdm = None  # the progress bar over bytes
    start: float = 0.0  # when the transfer started
    shown: float = 0.0  # when the last plain progress line was printed

    def url(self, path):
        return self.base + self.manifest[path][len(OPENNEURO):]

    def resume(self):
        """The advice for a fetch that stopped: how far it got, and how to go on."""
        done = sum(os.path.isfile(os.path.join(self.out, p)) for p in self.paths)
        return (f"{done} of {len(self.paths)} files are complete, run the same command again to "
                "resume")

    def failed(self, path, e):
        """The one line for a network or server error while getting path."""
        if isinstance(e, urllib.error.HTTPError):
            where = self.url(path).split('?')[0]
            return ValueError(f"{path}: HTTP {e.code} {e.reason} from {where}")
        return ValueError(f"cannot reach {self.base} ({getattr(e, 'reason', e)}); {self.resume()}")

    def size(self, path):
        """The server's Content-Length of path."""
        request = urllib.request.Request(self.url(path), method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return int(r.headers["Content-Length"])
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise self.failed(path, e) from None


def fetch(out, subjects, pycortex=False, manifest=None, base_url=None):
    """Download fetch_list's files into `out` in ds003020's layout, each from the manifest's
    address (the object's version id included, so every user gets the same bytes) under
    `base_url` (a mirror; default OpenNeuro's, or $BRAINTUNE_MIRROR). A file goes to <name>.part,
    resumed with an HTTP Range after an interruption, is checked against the size the server
    announces, then renamed: a file under its real name is complete, and a second run downloads
    nothing."""
    if manifest is None:
        with open(MANIFEST) as f:
            manifest = json.load(f)
    try:
        base = address(base_url or os.environ.get("BRAINTUNE_MIRROR") or OPENNEURO)
    except ValueError as e:
        raise ValueError(f"{'--base-url' if base_url else '$BRAINTUNE_MIRROR'}: {e}") from None
    subjects = ["UT" + s if "UT" + s in REAL_SUBJECTS else s for s in subjects]
    for s in subjects:
        if s not in REAL_SUBJECTS:
            raise ValueError(f"--subject {s}: not a subject of ds003020; they are "
                             f"{', '.join(REAL_SUBJECTS)}")
    other = sorted(set(os.listdir(out)) - {"derivative", "stimuli"}) if os.path.isdir(out) else []
    if os.path.exists(out) and (other or not os.path.isdir(out)):
        raise ValueError(f"{out}: already holds {', '.join(other) or 'a file'}; fetch into a new "
                         "folder or an earlier fetch's")
    guard.writable_folder(out, "--out")
    job = Download(out, base, manifest, fetch_list(manifest, subjects, pycortex))
    print(f"ds003020 2.2.0 for {', '.join(subjects)}: {len(job.paths)} files into {out}",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sizes = dict(zip(job.paths, pool.map(job.size, job.paths)))

    def have(p, suffix=""):  # bytes of p (or of its .part) on disk
        path = os.path.join(out, p) + suffix
        return os.path.getsize(path) if os.path.isfile(path) else None
    todo = [p for p in job.paths if have(p) != sizes[p]]
    need = sum(sizes[p] - (have(p, ".part") or 0) for p in todo)
    free = shutil.disk_usage(guard.existing(out)).free
    print(f"{sum(sizes.values()) / 1e9:.1f} GB in all; {len(todo)} files, {need / 1e9:.1f} GB, to "
          f"download ({free / 1e9:.0f} GB free)", flush=True)
    guard.fits_on_disk(need, out, f"the download into {out}", "--subject or --pycortex")
    os.makedirs(out, exist_ok=True)
    job.overall = tqdm(total=need, unit="B", unit_scale=True, desc="ds003020",
                       disable=not sys.stderr.isatty())
    job.start = job.shown = time.time()
    for i, p in enumerate(todo):
        get(job, p, sizes[p], f"{i} of {len(todo)} files")
    job.overall.close()
    done = sum(have(p) is not None for p in job.paths)
    print(f"{done} of {len(job.paths)} files complete in {out}", flush=True)
    return job.paths


def get(job, name, size, where):
    """File `name` of the Download job into its folder: to <name>.part, resumed by an HTTP Range
    request where a part exists, checked against the announced size, then renamed."""
    path = os.path.join(job.out, name)
    part = path + ".part"
    os.makedirs(os.path.dirname(part), exist_ok=True)
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have >= size:  # complete but not renamed (killed in between), or not this file
        if have == size:
            os.replace(part, path)
            return
        os.remove(part)
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    request = urllib.request.Request(job.url(name), headers=headers)
    one = tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path),
               leave=False, disable=job.overall.disable)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            with open(part, "ab" if r.status == 206 else "wb") as f:
                for chunk in iter(functools.partial(r.read, 1 << 20), b""):
                    f.write(chunk)
                    job.overall.update(len(chunk))
                    one.update(len(chunk))
                    show_progress(job, where)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        raise job.failed(name, e) from None
    except OSError as e:
        raise ValueError(f"{part}: cannot write ({e.strerror}); free some space and run the same "
                         "command again to resume") from None
    finally:
        one.close()
    got = os.path.getsize(part)
    if got < size:  # the connection dropped
        raise ValueError(f"{name}: the transfer stopped at {got} of {size} bytes; {job.resume()}")
    if got > size:
        os.remove(part)
        raise ValueError(f"{name}: {got} bytes arrived where the server announced {size}; not kept")
    os.replace(part, path)


def show_progress(job, where):
    """A plain progress line every 30 s where no terminal shows the bars."""
    if sys.stderr.isatty() or time.time() - job.shown <= 30:
        return
    job.shown = time.time()
    print(f"fetched {job.overall.n / 1e9:.2f} of {job.overall.total / 1e9:.2f} GB, {where}, "
          f"{job.shown - job.start:.0f} s", file=sys.stderr, flush=True)


def parser():
    p = guard.Parser(description="download what braintune reads of OpenNeuro ds003020 2.2.0")
    p.add_argument("dataset", choices=["ds003020"], help="the dataset (ds003020, the only one)")
    p.add_argument("--out", default=None, help="folder to fetch into (default: ./ds003020)")
    p.add_argument("--subject", default="UTS01", help="subjects, comma-separated (UTS01..UTS08; "
                                                      "S01 works too)")
    p.add_argument("--pycortex", action="store_true", help="also their pycortex database (ROIs, "
                                                           "flatmaps)")
    p.add_argument("--base-url", type=guard.argtype(address), default=None,
                   help=f"a mirror of {OPENNEURO} (or $BRAINTUNE_MIRROR)")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    fetch(a.out or a.dataset, a.subject.split(","), a.pycortex, base_url=a.base_url)


if __name__ == "__main__":
    guard.main_guard(main, kept="the files under their real names are complete: run the same "
                                "command again to resume")
