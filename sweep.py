"""
Quick ablations: every setting of a few train.py flags, each with every seed, as ordinary run
folders under sweeps/NAME/, and the statistics that say which differences are real.

    python sweep.py rank --vary lora-rank=0,4,16 --seeds 0,1,2 -- --roi semantic --epochs 3
    python sweep.py rank --jobs 2 --vary ...    # two runs at once, the cores divided between them
    python sweep.py rank --print --vary ...     # one train.py command a line, for any scheduler
    python sweep.py rank --slurm --vary ...     # a Slurm job array: sbatch sweeps/rank/slurm.sh
    python sweep.py rank --report               # the table of whatever has finished
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import cache
import compare
import config
import flags
import data
import plots
import preflight
import synthetic
import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, EVAL = os.path.join(HERE, "train.py"), os.path.join(HERE, "eval.py")
OWN = ("seed", "out", "resume", "force")  # set by the sweep for each run
# what every run shares, so that their test blocks and voxels pair
SHARED = ("subject", "data", "test_stories", "test_skip", "block")
DONE = ("results.json", "voxel_r.npz", "blocks.pt")  # a finished run has them all
ALPHA = 0.05  # the family-wise error of the comparisons with the reference


@dataclass
class Spec:
    """A sweep's command, as sweeps/NAME/sweep.json records it."""
    vary: list  # [[flag, [value, ...]]]: the flags varied (train.py's, without --), in order
    seeds: list  # [int]: every setting runs with each
    train: list  # [str]: train.py's flags after --, the same for every run


@dataclass
class Run:
    """One run of the sweep: a setting with a seed."""
    name: str  # its folder's name, "lora-rank=4,seed=1"
    folder: str  # sweeps/NAME/<name>, absolute
    setting: str  # "lora-rank=4"; the first setting is the reference
    seed: int
    flags: list  # [str]: train.py's flags but --seed and --out


@dataclass
class Job:
    """A command the sweep runs as a process of its own."""
    label: str  # the run's name
    argv: list  # [str]
    log: str  # the file its output goes to


def parser():
    p = argparse.ArgumentParser(description="Every setting of a few train.py flags with every "
                                "seed (sweeps/NAME/), and the table of their changes; train.py's "
                                "other flags follow --.")
    a = p.add_argument
    a("name", help="the sweep's name: its folder is sweeps/NAME")
    a("--vary", action="append", default=[], help="FLAG=V1,V2,...: train.py's flag and the "
      "values it takes (several --vary: every combination); the first value of each is the "
      "reference")
    a("--seeds", help="the seeds every setting runs with, comma-separated (e.g. 0,1,2)")
    a("--jobs", type=int, default=1, help="runs at once on this machine, the CPU threads divided "
                                          "between them")
    a("--print", action="store_true", help="print the train.py command of each unfinished run, "
                                           "one a line, instead of running them")
    a("--slurm", action="store_true", help="write sweeps/NAME/slurm.sh, a Slurm job array of one "
                                           "task per run, instead of running them")
    a("--report", action="store_true", help="only the table of the runs that have finished")
    a("--probe", choices=["semantic", "phones"], help="a column: eval.py --probe on every run")
    a("--subject", help="a column: eval.py --subject (transfer to this subject) on every run")
    a("--downstream", choices=sorted(tasks.TASKS), help="a column: eval.py --downstream TASK on "
      "every run, at the layer it tuned")
    a("--downstream-data", help="the --downstream task's folder")
    return p


def parse_spec(a, train):
    """The command as a Spec, each part checked alone: the --vary flags known to train.py, taking
    a value, not the sweep's own nor given after --, their values distinct; the seeds."""
    known = {s: x for x in flags.parser()._actions for s in x.option_strings}  # train.py's
    vary = []
    for text in a.vary:
        flag, _, values = text.partition("=")
        option = "--" + flag.lstrip("-")
        if option not in known:
            raise ValueError(f"--vary {text}: train.py has no flag {option}")
        dest = known[option].dest
        if known[option].nargs == 0 or dest == "help":
            raise ValueError(f"--vary {text}: {option} takes no value; give it after -- to set it "
                             "for every run")
        if dest in OWN + SHARED:
            why = "the sweep sets it for each run" if dest in OWN else "every run must share it, "\
                "so that their test blocks and voxels pair"
            raise ValueError(f"--vary {text}: {option} cannot be varied ({why})")
        values = values.split(",") if values else []
        if not values or not all(values) or len(set(values)) < len(values):
            raise ValueError(f"--vary {text}: expected FLAG=V1,V2,... with distinct values")
        if dest in [known["--" + f].dest for f, _ in vary]:
            raise ValueError(f"--vary {text}: {option} is varied twice")
        vary.append([option[2:], values])
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            given = config.given_flags(flags.parser(), train)
    except SystemExit:  # a value of the wrong type: refused in train.py's words (check_settings)
        given = {}
    for dest in given:
        flag = "--" + dest.replace("_", "-")
        if dest in OWN:
            raise ValueError(f"{flag} after --: the sweep sets it for each run (--seeds for the "
                             "seeds, sweeps/NAME for the folders)")
        if dest in [known["--" + f].dest for f, _ in vary]:
            raise ValueError(f"{flag}: given both in --vary and after --; give it in one place")
    try:
        seeds = [int(s) for s in (a.seeds or "").split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds {a.seeds or '(not given)'}: expected distinct whole numbers, "
                         "comma-separated (e.g. 0,1,2)")
    return Spec(vary, seeds, list(train))


def make_runs(spec, folder):
    """Every setting (the product of the --vary values, the first value of each first) with every
    seed: settings outer, so that the reference's row of the table is the first to be whole."""
    runs = []
    for values in itertools.product(*[v for _, v in spec.vary]):
        pairs = [(f, v) for (f, _), v in zip(spec.vary, values)]
        setting = ",".join(f"{f}={v}" for f, v in pairs) or "as given"
        flags = spec.train + [x for f, v in pairs for x in (f"--{f}", v)]
        for seed in spec.seeds:
            name = ",".join([f"{f}={v}".replace("/", "_") for f, v in pairs] + [f"seed={seed}"])
            runs.append(Run(name, os.path.join(folder, name), setting, seed, flags))
    if len({r.name for r in runs}) < len(runs):
        raise ValueError("--vary: two settings would share a folder name (values that differ "
                         "only by /); give other values")
    return runs


def refused(argv):
    """train.py's refusal of its flags argv, in one sentence (config.parse), or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = config.parse(argv)
    except ValueError as e:
        return str(e)
    except SystemExit:  # argparse: a usage line, then "prog: error: ..."
        return err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
    if args.synthetic and not os.path.isdir(args.data):  # made once here, not by runs at once
        cache.log(f"making the synthetic dataset in {args.data} (once)")
        with cache.atomic_folder(args.data) as tmp:
            synthetic.make_demo(tmp)
    pretraining = args.model == "tiny" and args.weights is None and args.tiny_pretrain > 0
    try:
        preflight.list_subjects(args, args.subject.split(","), textgrids=pretraining)
    except ValueError as e:
        return str(e)
    return None


def check_settings(spec, runs, a, *, new):
    """A new sweep's settings as train.py would refuse them (its flags and the dataset's
    listings), and the eval.py columns asked, before any run starts."""
    why = refused(spec.train + ["--seed", str(spec.seeds[0])]) if new else None
    if why:
        raise ValueError(f"the train.py flags after --: {why}")
    for r in runs[::len(spec.seeds)] if new and spec.vary else ():  # one run of each setting
        why = refused(r.flags + ["--seed", str(r.seed)])
        if why:
            raise ValueError(f"--vary {r.setting}: train.py would refuse it: {why}")
    if a.subject:
        data.find_subject(config.parse(runs[0].flags).data, a.subject)
    if a.downstream and not a.downstream_data:
        raise ValueError(f"--downstream {a.downstream}: give the task's folder with "
                         "--downstream-data PATH")


def state(run):
    """finished (DONE there), resume (a config.json: killed half way) or fresh."""
    if all(os.path.isfile(os.path.join(run.folder, f)) for f in DONE):
        return "finished"
    return "resume" if os.path.isfile(os.path.join(run.folder, "config.json")) else "fresh"


def fresh(run):
    """The train.py command of a new run."""
    return [sys.executable, TRAIN, *run.flags, "--seed", str(run.seed), "--out", run.folder]


def command(run):
    """The train.py command that finishes the run: --resume of a killed one, else a new run
    (--force over a folder killed before its config was written)."""
    if state(run) == "resume":
        return [sys.executable, TRAIN, "--resume", run.folder]
    return fresh(run) + (["--force"] if os.path.exists(run.folder) else [])


def launch(jobs, n):
    """Each Job as a process, n at once, each with its share of the cores as torch's threads
    (OMP_NUM_THREADS and MKL_NUM_THREADS) when n > 1; a line as each starts and ends. Returns the
    failures' lines."""
    env = dict(os.environ)
    if n > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env.update(OMP_NUM_THREADS=str(max(1, cores // n)), MKL_NUM_THREADS=str(max(1, cores // n)))
    waiting, running, failed = list(jobs), {}, []
    try:
        while waiting or running:
            while waiting and len(running) < n:
                job = waiting.pop(0)
                with open(job.log, "a") as log:  # a resumed run's log goes on
                    proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = (job, time.time())
                print(f"started {job.label}: {shlex.join(job.argv[1:])}", flush=True)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, t0 = running.pop(proc)
                if proc.returncode == 0:
                    print(f"finished {job.label} in {time.time() - t0:.0f} s", flush=True)
                    continue
                with open(job.log) as f:
                    last = ([line.strip() for line in f if line.strip()] or ["no output"])[-1]
                failed.append(f"{job.label} failed (exit {proc.returncode}): {last} (log: "
                              f"{job.log})")
                print(failed[-1], flush=True)
    except KeyboardInterrupt:
        for proc in running:  # the sweep's own processes; their runs resume next time
            proc.terminate()
            proc.wait()
        raise
    return failed


def run_config(run):
    """The flags the run recorded (config.json's args)."""
    return cache.read_json(os.path.join(run.folder, "config.json"))["args"]


def eval_flags(run, a):
    """eval.py's flags of the columns asked that the run's analyses.json lacks."""
    have = compare.analyses_deltas(run.folder, a.probe, a.subject, a.downstream)
    flags = dict(probe=["--probe", a.probe], transfer=["--subject", a.subject],
                 downstream=["--downstream", a.downstream, "--downstream-data",
                             a.downstream_data, "--downstream-layers",
                             str(compare.tuned_layer(run.folder))])
    return [x for k, v in have.items() if v is None for x in flags[k]]


def slurm(folder, runs):
    """sweeps/NAME/slurm.sh, a job array of one task per run: task i reads line i + 1 of runs.txt
    and commands.txt (each run's folder and its command as a new run), skips a finished run,
    resumes a killed one, else runs the command (--force: over a folder killed before its
    config.json was written)."""
    for name, lines in (("runs.txt", [r.folder for r in runs]),
                        ("commands.txt", [shlex.join(fresh(r) + ["--force"]) for r in runs])):
        cache.save_atomic("".join(x + "\n" for x in lines), os.path.join(folder, name))
    q, line = shlex.quote, 'sed -n "${i}p" ' + shlex.quote(folder)
    script = f"""#!/bin/bash
#SBATCH --job-name=sweep-{os.path.basename(folder)}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --output={folder}/logs/slurm-%a.log
# add your cluster's lines here (--partition, --gres=gpu:1, --cpus-per-task, --mem, --time)
# one task per run; then: python sweep.py {os.path.basename(folder)} --report
set -euo pipefail
cd {q(os.getcwd())}
i=$((SLURM_ARRAY_TASK_ID + 1))
run=$({line}/runs.txt)
if [ -f "$run/{DONE[0]}" ] && [ -f "$run/{DONE[1]}" ] && [ -f "$run/{DONE[2]}" ]; then
  echo "$run: finished"
elif [ -f "$run/config.json" ]; then
  {q(sys.executable)} {q(TRAIN)} --resume "$run"
else
  eval "$({line}/commands.txt)"
fi
"""
    cache.save_atomic(script, os.path.join(folder, "slurm.sh"))
    return os.path.join(folder, "slurm.sh")


def columns(by_seed, a):
    """The eval.py columns asked, each tuned minus pretrained (compare.analyses_deltas):
    {title: {setting: [value or None, one per seed]}}."""
    out, titles = {}, dict(probe=f"probe {a.probe}", transfer=f"transfer to {a.subject}",
                           downstream=f"{a.downstream}")
    for r in (r for runs in by_seed for r in runs):
        for k, v in compare.analyses_deltas(r.folder, a.probe, a.subject, a.downstream).items():
            out.setdefault(titles[k], {}).setdefault(r.setting, []).append(v)
    return out


def write_report(folder, spec, runs, a):
    """The table of the seeds every setting has finished (compare.sweep_statistics), and the
    eval.py columns asked: printed, and written beside the runs with the figure (report.md,
    report.json, sweep.png)."""
    settings = list(dict.fromkeys(r.setting for r in runs))
    done = [r for r in runs if state(r) == "finished"]
    seeds = [s for s in spec.seeds if sum(r.seed == s for r in done) == len(settings)]
    lines = [f"sweep {os.path.basename(folder)}: {len(done)} of {len(runs)} runs finished; the "
             f"seeds every setting has finished: {', '.join(map(str, seeds)) or 'none yet'}"]
    if not seeds:
        print(lines[0])
        return None
    by_seed = [[r for r in runs if r.seed == s] for s in seeds]  # settings in order
    read = [compare.read_seed([r.folder for r in rs], s) for rs, s in zip(by_seed, seeds)]
    stats = compare.sweep_statistics(read, settings, ALPHA)
    lines.append(compare.format_sweep(stats, settings))
    cols = columns(by_seed, a) if a.probe or a.subject or a.downstream else {}
    if cols:
        lines += ["", "eval.py on each run, tuned - pretrained: mean over the seeds (sd)",
                  compare.format_columns(cols)]
    png = plots.plot_sweep(stats, os.path.join(folder, "sweep.png"))
    cache.save_atomic(json.dumps(dict(stats, settings=settings, seeds=seeds, columns=cols),
                                 indent=1), os.path.join(folder, "report.json"))
    md = os.path.join(folder, "report.md")
    cache.save_atomic(f"# sweep {os.path.basename(folder)}\n\n    python sweep.py "
                      f"{os.path.basename(folder)} {shlex.join(command_line(spec))}\n\n```\n"
                      + "\n".join(lines) + "\n```\n\n![](sweep.png)\n", md)
    print("\n".join(lines) + f"\nwrote {md}, {png}")
    return stats


def command_line(spec):
    """The sweep's command, as sweep.py's arguments after its NAME."""
    vary = [x for f, v in spec.vary for x in ("--vary", f"{f}={','.join(v)}")]
    return [*vary, "--seeds", ",".join(map(str, spec.seeds)), "--", *spec.train]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # train.py's flags follow --
    a, train = parser().parse_args(argv[:cut]), argv[cut + 1:]
    if not a.name.strip(".") or "/" in a.name or os.sep in a.name:
        raise ValueError(f"{a.name}: a sweep's NAME is the name of a folder under sweeps/")
    if a.jobs < 1:
        raise ValueError(f"--jobs {a.jobs}: must be at least 1")
    if a.print + a.slurm + a.report > 1:
        raise ValueError("--print, --slurm and --report: give one of them")
    folder = os.path.abspath(os.path.join("sweeps", a.name))
    path = os.path.join(folder, "sweep.json")
    old = Spec(**cache.read_json(path)) if os.path.isfile(path) else None
    given = bool(a.vary or a.seeds or train)
    if old is None and not given or old is None and a.report:
        raise ValueError(f"{folder}: no such sweep; give its command (--vary FLAG=V1,V2 --seeds "
                         "0,1,2 -- FLAGS) without --report")
    spec = parse_spec(a, train) if given else old
    if old and old != spec:
        raise ValueError(f"{folder} holds another sweep ({shlex.join(command_line(old))}); give "
                         "its own command, only --report, or another NAME")
    runs = make_runs(spec, folder)
    check_settings(spec, runs, a, new=old is None)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    if old is None:
        cache.save_atomic(json.dumps(vars(spec), indent=1), path)
    if a.print:
        print("\n".join(shlex.join(command(r)) for r in runs if state(r) != "finished"))
        return None
    if a.slurm:
        print(f"wrote {slurm(folder, runs)}: submit it with sbatch, then run python sweep.py "
              f"{a.name} --report")
        return None
    logs = os.path.join(folder, "logs")
    todo = [] if a.report else [r for r in runs if state(r) != "finished"]
    if not a.report:
        print(f"sweep {a.name}: {len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} "
              f"to run, {a.jobs} at once; logs in {logs}", flush=True)
    jobs = [Job(r.name, command(r), os.path.join(logs, r.name + ".log")) for r in todo]
    # the first alone: it fills what the runs share (the dataset, tiny's pretraining, stage 1 where
    # the setting leaves it alone), which runs started together would each compute at once
    failed = launch(jobs[:1], 1) + launch(jobs[1:], a.jobs)
    evals = [Job(r.name, [sys.executable, EVAL, r.folder, *flags],
                 os.path.join(logs, r.name + ".eval.log"))
             for r in runs if state(r) == "finished" and (flags := eval_flags(r, a))]
    failed += launch(evals, a.jobs)
    stats = write_report(folder, spec, runs, a)
    if failed:
        raise ValueError(f"{len(failed)} of the sweep's commands failed (above, with their logs); "
                         "the same command runs them again")
    return stats


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the same command resumes the sweep")
