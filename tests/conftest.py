import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

import synthetic


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU; run by python bench.py --gpu")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped where there is no GPU; each has a CPU test of its logic."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (python bench.py --gpu)"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small synthetic dataset in the ds003020 layout, made once per test session."""
    return synthetic.make_demo(str(tmp_path_factory.mktemp("demo") / "ds"), n_subjects=3,
                               n_stories=5, n_voxels=90, seconds=60.0)


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory):
    """The caches of every test (and of the commands they run) in the session's own folder."""
    old = os.environ.get("BRAINTUNE_CACHE")
    os.environ["BRAINTUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["BRAINTUNE_CACHE"]
    if old is None:
        del os.environ["BRAINTUNE_CACHE"]
    else:
        os.environ["BRAINTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def run(demo, tmp_path_factory):
    """A finished two-epoch run on the demo dataset, for the analyses' tests."""
    import train
    out = tmp_path_factory.mktemp("runs") / "r"
    return train.main(["--data", demo, "--model", "tiny", "--out", str(out), "--batch-size", "8",
                       "--epochs", "2", "--lora-dropout", "0"])


@pytest.fixture
def killed_after_one_epoch(monkeypatch):
    """run(argv): train.main(argv) killed (Ctrl-C) right after its first epoch's checkpoint and
    metrics.jsonl are saved, the run folder left as a crash would leave it."""
    import runfolder
    import train

    def run(argv):
        real_save = runfolder.save_atomic

        def crash(obj, path):
            real_save(obj, path)
            if path.endswith("metrics.jsonl"):
                raise KeyboardInterrupt
        monkeypatch.setattr(runfolder, "save_atomic", crash)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
        monkeypatch.setattr(runfolder, "save_atomic", real_save)
    return run


def cannot_write(folder):
    """Whether this process is refused a new file in `folder`."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
        return False
    except OSError:
        return True


@pytest.fixture
def read_only(tmp_path_factory):
    """A folder this process cannot write in: one with its write bits off or, where that does not
    stop the process (root writes anywhere), /sys, which takes no new file from anyone."""
    folder = tmp_path_factory.mktemp("ro")
    folder.chmod(0o555)
    found = next((f for f in (str(folder), "/sys") if os.path.isdir(f) and cannot_write(f)), None)
    if found is None:
        pytest.skip("no folder here refuses this process a new file (chmod and /sys both allow)")
    yield found
    folder.chmod(0o755)
