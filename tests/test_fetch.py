"""fetch.py against a local HTTP server serving a small tree in ds003020's layout: no test
reaches the internet."""
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse

import h5py
import numpy as np
import pytest

import flags
import data
import fetch
import probes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = {  # two subjects who heard different stories; files neither of them needs
    "derivative/preprocessed_data/UTS01/a.hf5": 3000,
    "derivative/preprocessed_data/UTS01/b.hf5": 5000,
    "derivative/preprocessed_data/UTS02/b.hf5": 5000,
    "derivative/preprocessed_data/UTS02/c.hf5": 700,
    "stimuli/a.wav": 4000, "stimuli/b.wav": 4100, "stimuli/c.wav": 900,
    "stimuli/auditory_localizer.wav": 300,
    "derivative/TextGrids/a.TextGrid": 200, "derivative/TextGrids/b.TextGrid": 210,
    "derivative/TextGrids/c.TextGrid": 220, "derivative/english1000sm.hf5": 1500,
    "derivative/pycortex-db/UTS01/transforms/UTS01_auto/mask_thick.nii.gz": 120,
    "derivative/pycortex-db/UTS02/transforms/UTS02_auto/mask_thick.nii.gz": 130,
    "derivative/respdict.json": 50,
}


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` under /ds003020/ with HEAD and Range; records every request; can cut one
    transfer halfway (cut), announce a wrong size (lie) or answer 404 (gone)."""

    def __init__(self, files):
        self.files, self.requests, self.cut, self.lie, self.gone = files, [], set(), set(), set()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                path = urllib.parse.urlparse(self.path).path.removeprefix("/ds003020/")
                server.requests.append((self.command, path, self.headers.get("Range")))
                if path not in server.files or path in server.gone:
                    return self.send_error(404)
                content = server.files[path]
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                self.send_response(206 if start else 200)
                self.send_header("Content-Length",
                                 str(len(content) - start + (7 if path in server.lie else 0)))
                self.end_headers()
                if body:
                    if path in server.cut:  # half the bytes, then the connection drops
                        server.cut.discard(path)
                        self.wfile.write(content[start:start + (len(content) - start) // 2])
                        self.close_connection = True
                        return
                    self.wfile.write(content[start:])

            def log_message(self, *a):
                pass
        server = self
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/ds003020"


@pytest.fixture
def server():
    rng = np.random.default_rng(0)
    s = Server({p: rng.integers(0, 256, n, dtype=np.uint8).tobytes() for p, n in TREE.items()})
    yield s
    s.shutdown()
    s.server_close()


MANIFEST = {p: f"{fetch.OPENNEURO}/{p}?versionId=v1" for p in TREE}


def test_fetch_gets_exactly_what_braintune_reads_and_resumes(server, tmp_path):
    out = tmp_path / "ds"
    server.cut.add("stimuli/b.wav")
    cut = (r"stimuli/b.wav: the transfer stopped at 2050 of 4100 bytes; 6 of 7 files are "
           r"complete, run the same command again to resume")
    with pytest.raises(ValueError, match=cut):
        fetch.fetch(str(out), ["S01"], manifest=MANIFEST, base_url=server.url)
    assert not (out / "stimuli" / "b.wav").exists()
    assert (out / "stimuli" / "b.wav.part").stat().st_size == 2050
    server.requests.clear()
    fetch.fetch(str(out), ["UTS01"], manifest=MANIFEST, base_url=server.url)
    gets = [(p, r) for c, p, r in server.requests if c == "GET"]
    assert gets == [("stimuli/b.wav", "bytes=2050-")]  # only the rest of the cut file
    want = ["derivative/TextGrids/a.TextGrid", "derivative/TextGrids/b.TextGrid",
            "derivative/english1000sm.hf5",
            "derivative/preprocessed_data/UTS01/a.hf5", "derivative/preprocessed_data/UTS01/b.hf5",
            "stimuli/a.wav", "stimuli/b.wav"]
    got = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert got == sorted(want) and all((out / p).read_bytes() == server.files[p] for p in want)
    server.requests.clear()
    # a second run downloads nothing
    fetch.fetch(str(out), ["UTS01"], manifest=MANIFEST, base_url=server.url)
    assert {c for c, _, _ in server.requests} == {"HEAD"} and {p for _, p,
                                                               _ in server.requests} == set(want)
    fetch.fetch(str(out), ["UTS01"], pycortex=True, manifest=MANIFEST, base_url=server.url)
    assert (out / "derivative/pycortex-db/UTS01/transforms/UTS01_auto/mask_thick.nii.gz").exists()
    assert not (out / "derivative/pycortex-db/UTS02").exists()


def test_fetch_errors_name_the_file_and_leave_no_half_file(server, tmp_path):
    out = str(tmp_path / "ds")
    server.lie.add("stimuli/a.wav")  # announces 7 bytes fewer than it sends
    with pytest.raises(ValueError,
                       match=r"stimuli/a.wav: the transfer stopped at 4000 of 4007 bytes"):
        fetch.fetch(out, ["UTS01"], manifest=MANIFEST, base_url=server.url)
    assert not os.path.exists(os.path.join(out, "stimuli", "a.wav"))
    server.lie.clear()
    server.gone.add("derivative/TextGrids/b.TextGrid")
    with pytest.raises(ValueError, match=r"derivative/TextGrids/b.TextGrid: HTTP 404"):
        fetch.fetch(out, ["UTS01"], manifest=MANIFEST, base_url=server.url)
    unknown = r"--subject UTS09: not a subject of ds003020; they are UTS01, .*UTS08"
    with pytest.raises(ValueError, match=unknown):
        fetch.fetch(out, ["UTS09"], manifest=MANIFEST, base_url=server.url)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"mine: already holds notes.txt"):
        fetch.fetch(str(tmp_path / "mine"), ["UTS01"], manifest=MANIFEST, base_url=server.url)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    down = subprocess.run([sys.executable, "fetch.py", "ds003020", "--out", str(tmp_path / "new"),
                           "--base-url",
                           f"http://127.0.0.1:{port}/ds003020"], cwd=ROOT, capture_output=True,
                           text=True)
    assert down.returncode != 0 and "Traceback" not in down.stderr
    assert down.stderr.strip().startswith("error: cannot reach http://127.0.0.1")
    assert "run the same command again" in down.stderr


def test_the_shipped_manifest_has_every_story_the_recipes_and_defaults_name():
    manifest = json.load(open(fetch.MANIFEST))
    assert len(manifest) == 771
    assert all(u.startswith(fetch.OPENNEURO + "/") and "versionId=" in u
               for u in manifest.values())

    def stories(s):
        folder = f"derivative/preprocessed_data/{s}/"
        return {p.rsplit("/", 1)[1][:-4] for p in manifest if p.startswith(folder)}
    named = {data.TEST_STORY, "stagefright"}  # the defaults
    for recipe in flags.RECIPES.values():
        named |= set(recipe.get("val_stories", "").split(",")) - {""}
    for s in ("UTS01", "UTS02", "UTS03"):
        assert named <= stories(s), named - stories(s)
    for s in ("UTS04", "UTS05", "UTS06", "UTS07", "UTS08"):
        assert {data.TEST_STORY, "stagefright"} <= stories(s)
    # every story a subject heard comes with its audio and its TextGrid
    for s in fetch.REAL_SUBJECTS:
        got = fetch.fetch_list(manifest, [s])
        assert len(got) == 1 + 3 * len(stories(s))
        assert all(f"derivative/TextGrids/{t}.TextGrid" in got for t in stories(s))


def test_english1000_is_read_column_by_word(tmp_path):
    path = str(tmp_path / "english1000sm.hf5")
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(6.0).reshape(3, 2)  # (dimensions, words)
        f["vocab"] = np.array([b"Hello", b"world"])
    emb = probes.load_embeddings(path)
    assert list(emb) == ["hello", "world"] and emb["world"].tolist() == [1.0, 3.0, 5.0]
    os.makedirs(tmp_path / "ds" / "derivative")
    with pytest.raises(ValueError, match="no word vectors in .*english1000sm.hf5 .*--embeddings"):
        probes.default_embeddings(str(tmp_path / "ds"))
    os.rename(path, tmp_path / "ds" / "derivative" / "english1000sm.hf5")
    assert probes.default_embeddings(str(tmp_path / "ds")).endswith("english1000sm.hf5")
