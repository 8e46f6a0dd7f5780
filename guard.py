"""
Off the happy path: the mechanisms that refuse a user's mistake in one sentence naming the flag or
the file, before any work, with nothing left behind (docs/contributing.md), so that a command is
built from them rather than checking each case by hand:

    p = guard.Parser(description="...")          # argparse's errors on one line, exit 2
    p.add_argument("--lr", type=guard.number(float, low=0, low_open=True), help="...")
    p.add_argument("--layers", type=guard.argtype(parse_layers), help="...")  # its ValueError
    args = p.parse_args(argv)
    guard.new_path(args.export, "--export")        # a new file, in a folder that can be written
    guard.new_path(args.out, "OUT", folder=True)   # a new (or empty) folder
    guard.writable_folder(cache_root(), "$BRAINTUNE_CACHE")  # written in, made if absent
    guard.fits_in_memory(nbytes, "the lambda grid", "--alphas")
    guard.fits_on_disk(nbytes, args.out, "the dataset", "--voxels or --seconds")
    roi = guard.load_array(path, "--roi")         # np.load without pickles
    lock = guard.RunLock(run).acquire()            # one writer per run folder, for life
    if __name__ == "__main__":
        guard.main_guard(main, kept="...")         # "error: ..." and exit 1; Ctrl-C: exit 130

What a script owes: every numeric flag typed number(...) with its real range; ranges that depend on
the data (blocks, test rows, history, lambdas) checked against the listings before any work; every
place written checked by new_path or writable_folder first; every user's np.load a load_array;
every allocation that grows with a flag checked by fits_in_memory; a run folder held by RunLock
(rank 0, before config.json is written); __main__ is main_guard(main), which prints on rank 0 only
and exits non-zero on every rank. config.given_flags's second parser is a Parser too.
"""
import argparse
import contextlib
import fcntl
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np


# -----------------------------------------------------------------------------
# flags

class Parser(argparse.ArgumentParser):
    """argparse's parser, its errors one line (`error: argument --lr: must be ...`, exit 2, no
    usage block), a number() flag's range appended to its help. Subcommands' parsers are Parsers
    too (add_subparsers makes them of the parser's own class)."""

    def error(self, message):
        self.exit(2, f"error: {one_line(message)}\n")

    def add_argument(self, *names, **kw):
        if isinstance(kw.get("type"), Number) and kw.get("help"):
            kw["help"] = f"{kw['help']}; {kw['type']}"
        return super().add_argument(*names, **kw)


@dataclass(frozen=True)
class Number:
    """An argparse type: a finite float, or an int (1e3 is 1000, 1.5 is refused), within a range
    (None: unbounded; open: the bound itself excluded). str() describes it: 'an integer >= 3'."""
    kind: type
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, text):
        value = self.parse(text)
        if value is None or not self.holds(value):
            raise argparse.ArgumentTypeError(f"must be {self} (got {text!r})")
        return value

    def parse(self, text):  # the value, or None where the text is not a finite `kind`
        try:
            x = float(text)
        except ValueError:
            return None
        if not math.isfinite(x):
            return None
        if self.kind is float:
            return x
        try:
            return int(text)  # exact, however large
        except ValueError:
            return int(x) if x.is_integer() else None

    def holds(self, x):
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self):  # 'an integer >= 3', 'a finite number in [0, 1)'
        what = "an integer" if self.kind is int else "a finite number"
        low, high = (f"{v:g}" if isinstance(v, float) else v for v in (self.low, self.high))
        if low is not None and high is not None:
            return f"{what} in {'[('[self.low_open]}{low}, {high}{'])'[self.high_open]}"
        if low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        return f"{what} {'<' if self.high_open else '<='} {high}" if high is not None else what


def number(kind=float, *, low=None, high=None, low_open=False, high_open=False):
    """`type=number(int, low=3)`: the flag's value checked where it is declared, so that inf, nan,
    a fraction where an integer is meant and a value out of range are refused by argparse."""
    assert kind in (int, float), kind
    return Number(kind, low, high, low_open, high_open)


def argtype(parse):
    """An argparse type from parse(text) -> value, which raises ValueError with its reason: the
    reason becomes argparse's one line (`error: argument --base-url: <reason>`), where argparse
    itself would say only 'invalid parse value'."""
    def checked(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    checked.__name__ = parse.__name__
    return checked


# -----------------------------------------------------------------------------
# places written, checked before any work

def named(flag, path):
    """How a sentence names a place: '--out /x/y', or the path alone for a positional argument."""
    return f"{flag} {path}" if flag else str(path)


def writable_folder(path, flag):
    """`path` as a folder this process can write in: one that is there, or one that can be made
    (the nearest folder above it that exists can be written in, and no file stands in the way).
    Nothing is made here. Returns path."""
    _check_folder(path, named(flag, path))
    return path


def new_path(path, flag, *, folder=False):
    """`path` as the place of a new file (folder=True: of a new folder, or an empty one): nothing
    there yet, so that nothing a user wrote is overwritten, and the folder it goes in writable (for
    a file, a folder that exists; for a folder, one that exists or can be made). Returns path."""
    name = named(flag, path)
    if not path:
        raise ValueError(f"{flag or 'the output'}: an empty path; give a path to write to")
    if os.path.lexists(path) and not (folder and os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{name}: already exists; choose a new {'folder' if folder else 'file'} "
                         "(nothing was written)")
    parent = os.path.dirname(os.path.abspath(path))
    if not folder and not os.path.isdir(parent):
        raise ValueError(f"{name}: no folder {parent} to write it in")
    _check_folder(parent, name)
    return path


def _check_folder(path, name):
    if not path:
        raise ValueError(f"{name}: an empty path")
    there = existing(path)  # the folder itself, or the nearest place above it that exists
    if not os.path.isdir(there):
        what = "a file" if os.path.isfile(there) else "not a folder (a broken link?)"
        raise ValueError(f"{name}: {there} is {what}, where a folder must be")
    try:  # a file made and removed: the one test that root, read-only mounts and ACLs all answer
        fd, probe = tempfile.mkstemp(dir=there, prefix=".braintune-probe-")
    except OSError as e:
        raise ValueError(f"{name}: cannot write in {there} ({e.strerror})") from None
    os.close(fd)
    os.remove(probe)


def existing(path):
    """The absolute path, or the nearest folder above it that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


# -----------------------------------------------------------------------------
# files read

def load_array(path, what, *, mmap_mode=None):
    """The array of a .npy file, or {name: array} of a .npz file (read whole, the file closed),
    never unpickling: a file missing, unreadable, not numpy's, holding Python objects or cut short
    is refused in one sentence naming it (numpy's own message would advise allow_pickle=True,
    which runs code from the file)."""
    name = named(what, path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ValueError(f"{name}: cannot read ({e.strerror})") from None
    if magic[:4] != b"PK\x03\x04" and magic != b"\x93NUMPY":  # .npz (a zip) or .npy
        raise ValueError(f"{name}: not a numpy file (.npy or .npz)")
    try:
        if magic == b"\x93NUMPY":
            return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds (EOFError, BadZipFile, ...)
        pickled = isinstance(e, ValueError) and "pickle" in str(e)
        why = "holds Python objects, not numbers" if pickled else "cut short or corrupt"
        raise ValueError(f"{name}: {why}; expected a numeric array saved by np.save") from None


# -----------------------------------------------------------------------------
# memory and disk, before the work

def available_memory():
    """Bytes this machine can still give (MemAvailable); inf where unknown, to err towards running.
    """
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return float("inf")


def fits_in_memory(nbytes, what, flags):
    """Refuse `what` (the command's largest allocations, estimated: nbytes) if it exceeds the
    memory free now, in one sentence with both and the flags that make it smaller (flags: '--voxels
    or --seconds')."""
    free = available_memory()
    if not math.isfinite(nbytes) or nbytes > free:
        raise ValueError(f"{what} needs about {size(nbytes)} of memory at once, but this machine "
                         f"has {size(free)} free (MemAvailable); lower {flags}")


def fits_on_disk(nbytes, path, what, flags):
    """Refuse `what` (nbytes written under path, which may not exist yet) if its disk has less."""
    free = shutil.disk_usage(existing(path)).free
    if not math.isfinite(nbytes) or nbytes > free:
        raise ValueError(f"{what} needs about {size(nbytes)} of disk, but {existing(path)} has "
                         f"{size(free)} free; lower {flags}")


def size(nbytes):
    """'1.2 GB', '340 MB', '3.1 TB'."""
    if not math.isfinite(nbytes):
        return "an unbounded amount"
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e6:.0f} MB"


# -----------------------------------------------------------------------------
# processes

class RunLock:
    """One writer per run folder: `with RunLock(folder):`, or RunLock(folder).acquire() for the
    process's life. The lock is the kernel's (flock on FOLDER/.lock), so a process that is killed
    holds nothing after; a second process is refused in one sentence naming the folder and the
    holder's pid. The file is removed on release (a killed holder's stays, held by no one)."""
    NAME = ".lock"

    def __init__(self, folder):
        assert os.path.isdir(folder), folder
        self.folder, self.path, self.file = folder, os.path.join(folder, self.NAME), None

    def acquire(self):
        while self.file is None:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise ValueError(f"{self.folder}: in use by another process (pid {holder}); wait "
                                 "for it to end") from None
            try:  # unless its holder removed it as we opened it: then lock the new one
                held = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                held = False
            if held:
                self.file = f
            else:
                f.close()
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        _HELD.append(self)  # held until released, even where the caller keeps no reference
        return self

    def rename(self, new):
        """The held folder renamed to `new` (os.rename), still held: its lock file goes with it."""
        os.rename(self.folder, new)
        self.folder, self.path = new, os.path.join(new, self.NAME)

    def release(self):
        if self.file is not None:
            with contextlib.suppress(FileNotFoundError):  # removed while held: whoever opens the
                os.remove(self.path)                      # path now makes a new file, and locks it
            self.file.close()
            self.file = None
            _HELD.remove(self)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_HELD = []  # the locks this process holds


def main_guard(main, *, kept="nothing was written"):
    """Run a command's main() as its __main__: a ValueError (a refusal) or an OSError that still
    escapes (a place that cannot be read or written, its path named) becomes one line `error: ...`
    and exit 1; MemoryError one line too; Ctrl-C one line `interrupted; <kept>` and exit 130, kept
    a sentence (or a function returning one) saying what was kept and how to go on. Under
    torchrun only rank 0 prints; every rank exits non-zero."""
    try:
        main()
        return
    except ValueError as e:
        line, code = f"error: {e}", 1
    except OSError as e:
        line, code = f"error: {os_error(e)}", 1
    except MemoryError as e:
        line, code = f"error: out of memory ({e or 'MemoryError'})", 1
    except KeyboardInterrupt:
        line, code = f"interrupted; {kept() if callable(kept) else kept}", 130
    if int(os.environ.get("RANK", 0)) == 0:
        print(one_line(line), file=sys.stderr, flush=True)
    sys.exit(code)


def os_error(e):
    """An OSError as the shell says it: 'PATH: Permission denied', both paths for a rename."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    why = e.strerror or str(e) or type(e).__name__
    return f"{where}: {why}" if where else why


def one_line(message):
    return " ".join(str(message).split())
