"""guard.py: each mechanism refuses its mistake in one line naming the flag or the file, and leaves
nothing behind."""
import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refusal(parser, argv, capsys):
    """(exit status, stderr) of parser.parse_args(argv), which must exit."""
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    return e.value.code, capsys.readouterr().err


def flags():
    p = guard.Parser()
    p.add_argument("--lr", type=guard.number(float, low=0, low_open=True), help="rate")
    p.add_argument("--dropout", type=guard.number(float, low=0, high=1, high_open=True))
    p.add_argument("--voxels", type=guard.number(int, low=3), help="voxels")
    return p


@pytest.mark.parametrize("argv, says", [
    (["--lr", "inf"], "must be a finite number > 0 (got 'inf')"),
    (["--lr", "nan"], "must be a finite number > 0 (got 'nan')"),
    (["--lr=-inf"], "must be a finite number > 0 (got '-inf')"),
    (["--lr", "0"], "must be a finite number > 0 (got '0')"),  # an open bound
    (["--lr", "1e400"], "must be a finite number > 0 (got '1e400')"),  # overflows to inf
    (["--lr", "fast"], "must be a finite number > 0 (got 'fast')"),
    (["--dropout", "1"], "must be a finite number in [0, 1) (got '1')"),
    (["--dropout", "-0.1"], "must be a finite number in [0, 1) (got '-0.1')"),
    (["--voxels", "1.5"], "must be an integer >= 3 (got '1.5')"),
    (["--voxels", "2"], "must be an integer >= 3 (got '2')"),
    (["--voxels", "nan"], "must be an integer >= 3 (got 'nan')"),
])
def test_a_number_flag_refuses_non_finite_fractional_and_out_of_range_values(argv, says, capsys):
    code, err = refusal(flags(), argv, capsys)
    assert code == 2 and err == f"error: argument {argv[0].split('=')[0]}: {says}\n"


def test_a_number_flag_takes_its_range_and_says_it_in_the_help(capsys):
    a = flags().parse_args(["--lr", "1e-3", "--dropout", "0", "--voxels", "2000000000000000001"])
    assert (a.lr, a.dropout, a.voxels) == (1e-3, 0.0, 2000000000000000001)  # an int kept exact
    assert flags().parse_args(["--voxels", "1e3"]).voxels == 1000  # an integer in any notation
    assert isinstance(flags().parse_args(["--voxels", "1e3"]).voxels, int)
    with pytest.raises(SystemExit):
        flags().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "rate; a finite number > 0" in help_text and "voxels; an integer >= 3" in help_text


def test_every_parser_error_is_one_line_subcommands_included(capsys):
    p = guard.Parser()
    sub = p.add_subparsers(dest="command", required=True)
    words = sub.add_parser("words")
    words.add_argument("out")
    words.add_argument("--seconds", type=guard.number(float, low=0.025))
    for argv, says in ((["cut"], "argument command: invalid choice: 'cut'"),
                       ([], "the following arguments are required: command"),
                       (["words"], "the following arguments are required: out"),
                       (["words", "o", "--nosuch"], "unrecognized arguments: --nosuch"),
                       (["words", "o", "--seconds", "0"], "must be a finite number >= 0.025")):
        code, err = refusal(p, argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and says in err and "usage" not in err


def test_argtype_carries_its_reason_into_argparse_line(capsys):
    def even(text):
        if int(text) % 2:
            raise ValueError(f"expected an even number (got {text})")
        return int(text)
    p = guard.Parser()
    p.add_argument("--n", type=guard.argtype(even))
    assert p.parse_args(["--n", "4"]).n == 4
    assert refusal(p, ["--n", "3"], capsys) == (2, "error: argument --n: expected an even number "
                                                   "(got 3)\n")


def listing(folder):
    return sorted(os.listdir(folder))


def test_new_path_refuses_what_is_there_and_a_parent_that_cannot_hold_it(tmp_path, read_only):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep")
    (tmp_path / "empty").mkdir()
    before = listing(tmp_path)
    for path, folder, says in (
            (notes, False, f"--out {notes}: already exists; choose a new file"),
            (tmp_path / "mine", True, "mine: already exists; choose a new folder"),
            (notes / "x", True, f"{notes} is a file, where a folder must be"),
            (tmp_path / "no" / "x.pt", False, f"no folder {tmp_path}/no to write it in"),
            (os.path.join(read_only, "x"), True, f"cannot write in {read_only} ("),
            ("", True, "--out: an empty path")):
        with pytest.raises(ValueError) as e:
            guard.new_path(str(path), "--out", folder=folder)
        assert says in str(e.value), (says, str(e.value))
    # a new file, an empty folder, a folder under folders still to be made: accepted, nothing made
    assert guard.new_path(str(tmp_path / "x.pt"), "--out") == str(tmp_path / "x.pt")
    guard.new_path(str(tmp_path / "empty"), "OUT", folder=True)
    guard.new_path(str(tmp_path / "a" / "b" / "c"), "OUT", folder=True)
    assert listing(tmp_path) == before and notes.read_text() == "keep"


def test_writable_folder_refuses_a_file_in_the_way_and_a_folder_it_cannot_write(tmp_path,
                                                                                  read_only):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ValueError, match=f"^\\$BRAINTUNE_CACHE {tmp_path}/f/a/b: {tmp_path}/f is "
                                         "a file, where a folder must be$"):
        guard.writable_folder(str(tmp_path / "f" / "a" / "b"), "$BRAINTUNE_CACHE")
    with pytest.raises(ValueError, match=f"--out {tmp_path}/f: {tmp_path}/f is a file"):
        guard.writable_folder(str(tmp_path / "f"), "--out")
    with pytest.raises(ValueError, match=f"cannot write in {read_only} \\("):
        guard.writable_folder(os.path.join(read_only, "new", "deeper"), "--out")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(ValueError, match="is not a folder \\(a broken link\\?\\)"):
        guard.writable_folder(str(tmp_path / "link" / "x"), "--out")
    guard.writable_folder(str(tmp_path / "a" / "b"), "--out")  # can be made: not made
    assert listing(tmp_path) == ["f", "link"]


def test_load_array_reads_numbers_and_refuses_pickles_and_broken_files_by_name(tmp_path):
    x = np.arange(6.0).reshape(2, 3)
    np.save(tmp_path / "good.npy", x)
    np.savez(tmp_path / "good.npz", a=x, b=np.arange(3))
    assert np.array_equal(guard.load_array(str(tmp_path / "good.npy"), "--roi"), x)
    both = guard.load_array(str(tmp_path / "good.npz"), "--roi")
    assert list(both) == ["a", "b"] and np.array_equal(both["a"], x)
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "pickled.npz", a=np.array([{"a": 1}], dtype=object))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps([1, 2]))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:-8])
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:200])
    for name, says in (("pickled.npy", "holds Python objects, not numbers"),
                       ("pickled.npz", "holds Python objects, not numbers"),
                       ("plain.pkl", "not a numpy file (.npy or .npz)"),
                       ("cut.npy", "cut short or corrupt"), ("cut.npz", "cut short or corrupt"),
                       ("nope.npy", "cannot read (No such file or directory)"),
                       (".", "cannot read (Is a directory)")):
        with pytest.raises(ValueError) as e:
            guard.load_array(str(tmp_path / name), "--roi")
        line = str(e.value)
        assert line.startswith(f"--roi {tmp_path / name}: ") and says in line, line
        assert "allow_pickle" not in line and "\n" not in line


def test_memory_and_disk_refuse_what_this_machine_cannot_hold(tmp_path):
    free = guard.available_memory()
    assert 0 < free < float("inf")  # /proc/meminfo read
    guard.fits_in_memory(1e6, "a small thing", "--voxels")
    for nbytes in (10 * free, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^the grid needs about .* of memory at once, but this"
                                             " machine has .* free \\(MemAvailable\\); lower "
                                             "--alphas$"):
            guard.fits_in_memory(nbytes, "the grid", "--alphas")
    with pytest.raises(ValueError, match=f"needs about 1.0 PB of disk, but {tmp_path} has"):
        guard.fits_on_disk(1e15, str(tmp_path / "not" / "yet"), "the dataset", "--voxels")
    guard.fits_on_disk(1e3, str(tmp_path / "not" / "yet"), "the dataset", "--voxels")
    assert (guard.size(3.4e8), guard.size(2.5e10), guard.size(4.6e12)) == ("340 MB", "25.0 GB",
                                                                           "4.6 TB")


HOLD = "import sys, time, guard; guard.RunLock(sys.argv[1]).acquire(); print('held', flush=True);" \
       " time.sleep(60)"


def test_a_run_lock_refuses_a_second_writer_and_a_killed_holder_leaves_it_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match=f"^{tmp_path}: in use by another process "
                                             f"\\(pid {holder.pid}\\); wait for it to end$"):
            guard.RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with guard.RunLock(str(tmp_path)):  # the kernel released the killed holder's lock
        with pytest.raises(ValueError, match=f"\\(pid {os.getpid()}\\)"):
            guard.RunLock(str(tmp_path)).acquire()  # in this process too: one writer
    assert os.listdir(tmp_path) == []  # released: its file removed
    lock = guard.RunLock(str(tmp_path)).acquire()
    lock.release()


def test_a_run_lock_goes_with_its_folder_when_it_is_renamed(tmp_path):
    (tmp_path / "a").mkdir()
    lock = guard.RunLock(str(tmp_path / "a")).acquire()
    lock.rename(str(tmp_path / "b"))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'b'}: in use"):
        guard.RunLock(str(tmp_path / "b")).acquire()  # still held, under its new name
    lock.release()
    assert os.listdir(tmp_path / "b") == []


def main_guard_says(main, capsys, **kw):
    with pytest.raises(SystemExit) as e:
        guard.main_guard(main, **kw)
    return e.value.code, capsys.readouterr().err


def test_main_guard_turns_what_escapes_into_one_line(capsys, monkeypatch):
    def refused():
        raise ValueError("--lr inf: must be\nfinite")

    def unwritable():
        raise PermissionError(errno.EACCES, "Permission denied", "/ro/run/config.json")

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/d/x.tmp", None, "/d/x")

    def interrupted():
        raise KeyboardInterrupt
    assert main_guard_says(refused, capsys) == (1, "error: --lr inf: must be finite\n")
    assert main_guard_says(unwritable, capsys) == (1, "error: /ro/run/config.json: Permission "
                                                      "denied\n")
    assert main_guard_says(full, capsys) == (1, "error: /d/x.tmp -> /d/x: No space left on "
                                                "device\n")
    assert main_guard_says(interrupted, capsys, kept=lambda: "kept epoch 2; resume with X") == \
        (130, "interrupted; kept epoch 2; resume with X\n")
    monkeypatch.setenv("RANK", "1")  # under torchrun: rank 0 says it, every rank exits
    assert main_guard_says(refused, capsys) == (1, "")
    assert guard.main_guard(lambda: None) is None  # nothing escaped: no exit
