"""
The papers' analyses of a finished run: each a flag, each a small table, each merged into
RUN/analyses.json (other keys are kept). One command reads the run back once (load_run: a Run)
and hands it to every analysis it asks for.

    python eval.py RUN                      # the results table again, with noise-normalised r
    python eval.py RUN --subject S02        # cross-subject transfer (BrainWavLM)
    python eval.py RUN --probe semantic     # word meaning from features (BrainWavLM; probes.py)
    python eval.py RUN --probe phones       # phone identity from features (Moussa et al.)
    python eval.py RUN --lowlevel           # reliance on low-level features (Moussa et al.)
    python eval.py RUN --layers [2,5,9]     # the encoding r of each layer, pretrained and tuned
    python eval.py RUN --significance       # each voxel's r against zero (block permutation, FDR)
    python eval.py RUN --against RUN2       # two tuned runs, paired, with the difference's interval
    python eval.py RUN --efficiency         # encoding r against hours of fMRI, pretrained and tuned
    python eval.py RUN --seeds RUN2 RUN3 [--vs RUN4 RUN5]   # stability across runs
    python eval.py RUN --downstream speechcommands --downstream-data SC   # a speech task
    python eval.py RUN --flatmap            # pycortex flatmaps of r and its change (flatmap.py)
    python eval.py RUN --plot               # figures in RUN (plots.py)
    python eval.py RUN --export tuned.pt    # merged plain torchaudio state dict
    python eval.py RUN --export-hf DIR      # the tuned backbone for transformers and s3prl (hf.py)
"""
import argparse
import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass

import torch

import cache
import compare
import config
import data
import dist
import downstream
import flatmap
import guard
import hf
import lora
import plots
import preflight
import probes
import ridge
import runfolder
import tasks
from cache import save_atomic
from features import split_features
from model import Extractor, add_adapters, load_extractor

# seconds of audio a 2-core CPU forwards per second (bench.py --only extract; tiny's by bench.py
# --quick --only extract, 2,039; large's not measured: base's over its 3.5x the parameters;
# docs/speed.md), to say how long features take where a run's cached ones cannot be read
CPU_AUDIO_RATE = {"tiny": 2000.0, "base": 20.9, "large": 6.0}


@dataclass
class Run:
    """A finished run as the analyses see it."""
    folder: str
    args: argparse.Namespace  # its flags (config.parse of --resume: resolved, never written)
    subjects: list  # [str] the subjects it was tuned on; an analysis of one uses the first
    pretrained: Extractor  # the backbone before tuning, read where the run read it
    tuned: Extractor  # the tuned one (adapters loaded), or None for a stage-1 run
    settings: ridge.Settings  # how its ridges are fit and scored
    device: torch.device  # where its features are computed (the run's own, if this machine has it)

    def subject(self, name):
        """One subject's data (data.Subject), held out on the run's stories."""
        ds, _ = config.load_subjects(self.args, [name])
        return ds[0]

    def features(self, extractor, d, protocol=None):
        """{"train", "test"}: this extractor's features of subject d's rows, (rows, p): its
        windows, or, with a sliding protocol, a paper's context, Lanczos and delays."""
        windows = {s: d.windows[s] for s in ("train", "test")}
        return split_features(extractor, windows, self.args.history, self.device,
                              batch_size=self.args.infer_batch, protocol=protocol,
                              precision=self.args.precision)

    def fit(self, extractor, d, settings=None):
        """The encoding model of subject d on this extractor under the run's protocol (a
        ridge.RidgeFit)."""
        X = self.features(extractor, d, self.args.protocol)
        return ridge.fit_encoding(X, d, settings or self.settings, self.device)

    def stage1_cv(self):
        """Stage 1's cross-validated r of the first subject: what chooses the voxel sets."""
        first, *_ = runfolder.read_stage1(self.folder)
        return first.init.cv_r

    def protocol(self):
        """The run's protocol as results.json and analyses.json record it."""
        return dict(dataclasses.asdict(self.args.protocol), pool=self.args.pool)


def load_run(folder, device=None):
    """The Run in a run folder, its models on `device` (--device; default: the device the run
    was trained on where this machine has it, else the CPU, with a note); a folder that is not a
    finished run, or one written by another braintune, is refused in one sentence."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such run folder")
    for f in ("config.json", "results.json", "stage1.pt"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise ValueError(f"{folder} is incomplete: {f} is missing (did the run finish?)")
    args = config.parse(["--resume", folder])  # the run's flags, today's defaults for newer ones
    if not os.path.isdir(args.data):
        raise ValueError(f"{args.data}: the run's dataset (--data in {folder}/config.json) is not "
                         "there")
    runfolder.read_stage1(folder)  # of this braintune's format, or one sentence
    subjects = args.subject.split(",")
    listings = preflight.list_subjects(args, subjects)
    own = os.path.join(folder, "tiny_pretrained.pt")  # tiny's weights travel with the run
    weights = own if args.weights is None and os.path.isfile(own) else args.weights
    device = run_device(folder, args, listings, device)
    pre = load_extractor(args.model, args.layer, weights, args.seed, pool=args.pool).to(device)
    return Run(folder, args, subjects, pre, tuned_extractor(folder, args, pre),
               config.ridge_settings(args, listings), device)


def run_device(folder, args, listings, name=None):
    """The device an analysis of the run computes on: --device, or the one the run was trained
    on (config.json's ran_on) where this machine has it, so that the features and fits it cached
    are read back, not made again; else the CPU, saying in one line what that costs."""
    if name is not None:
        config.check_device(name)
        return torch.device(name)
    ran = runfolder.read_config(folder, "eval.py")["ran_on"]
    device = torch.device(ran["device"])
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", min(device.index or 0, torch.cuda.device_count() - 1))
    here = dist.precision_name(torch.device("cpu"), args.precision)
    if device.type != "cpu" or ran["precision"] != here:
        rows = sum(d.rows[s] for d in listings[:1] for s in d.stories["train"] + d.stories["test"])
        size = "tiny" if args.model == "tiny" else "large" if "large" in args.model else "base"
        rate = CPU_AUDIO_RATE[size]
        print(f"note: {folder} was trained on {ran['device']} in {ran['precision']}; on this "
              f"CPU in {here}, the features of its {rows} windows are extracted again, about "
              f"{rows * args.history * args.tr / rate / 60:.0f} min per backbone", flush=True)
    return torch.device("cpu")


def tuned_extractor(folder, args, pre):
    """The tuned Extractor of a run: a copy of the pretrained one with the adapters (and layer
    weights) of adapter.pt; None for a stage-1 run."""
    trainable = runfolder.read_adapter(folder)
    if trainable is None:
        return None
    tuned = copy.deepcopy(pre)  # the same pretrained weights, read once
    add_adapters(tuned.backbone, tuned.layer, args.lora_rank, args.lora_alpha, args.lora_dropout,
                 args.lora_targets)
    mine = {k[len("extractor."):]: v for k, v in trainable.items()
            if k.startswith("extractor.")}
    model = tuned.state_dict()
    wrong = sorted(k for k, v in mine.items() if k not in model or model[k].shape != v.shape)
    if wrong:
        raise ValueError(f"{folder}/adapter.pt does not fit the {args.model} model of its "
                         f"config.json ({wrong[0]}); it is not this run's")
    tuned.load_state_dict(mine, strict=False)
    return tuned.eval()


def read(run):
    """A Run, from itself or its folder."""
    return run if isinstance(run, Run) else load_run(run)


# -----------------------------------------------------------------------------
# the analyses

def show(folder):
    """The run's results table, as train.py printed it."""
    res = cache.read_json(os.path.join(folder, "results.json"))
    scored = res.get("protocol")
    if res.get("control"):
        c = res["control"]
        scored = dict(scored, control=f"{c['kind']} (blocks of {c['block']} TRs)")
    return ridge.format_table(compare.results(folder), scored)


def no_tuning(run):
    """Refuses an analysis of the tuned backbone on a stage-1 run."""
    if run.tuned is None:
        raise ValueError(f"{run.folder} has no tuned backbone (adapter.pt); it was a stage-1 run")


def cross_subject(run, subject):
    """The backbone tuned on the run's subject(s), ridge refit on another subject: test r against
    the pretrained backbone on that subject (BrainWavLM's transfer test)."""
    run = read(run)
    no_tuning(run)
    d = run.subject(subject)
    if d.name in [data.find_subject(run.args.data, s) for s in run.subjects]:
        print(f"note: {d.name} was tuned on in {run.folder}; this is not transfer to a new subject")
    base, new = run.fit(run.pretrained, d), run.fit(run.tuned, d)
    res = ridge.Results(ridge.sets(d, base.cv_r), None, base.test_r.numpy(), base.blocks,
                        refit_r=new.test_r.numpy(), refit_blocks=new.blocks)
    out = ridge.summarize(res, d.ceiling)
    cache.merge_analyses(run.folder, f"transfer_{d.name}", dict(out, protocol=run.protocol()))
    return ridge.format_table({d.name: out}, run.protocol())


def parse_layers(text, depth, model):
    """--layers: 'all' or comma-separated 1-based layers within the model."""
    try:
        layers = list(range(1, depth + 1)) if text == "all" else [int(x) for x in text.split(",")]
    except ValueError:
        layers = []
    if not layers or not all(1 <= x <= depth for x in layers):
        raise ValueError(f"--layers {text}: expected 'all' or layers from 1..{depth} of {model}, "
                         "comma-separated")
    return sorted(set(layers))


def export(run, path):
    """The tuned backbone merged into a plain torchaudio state dict."""
    guard.new_path(path, "--export")
    run = read(run)
    no_tuning(run)
    merged = lora.merged_copy(run.tuned.backbone)  # the loaded run stays as it was
    save_atomic(merged.state_dict(), path)
    return path


def write_hf(run, folder):
    """The tuned backbone, adapters merged, as a Hugging Face checkpoint of its family (hf.py)."""
    no_tuning(run)
    hf.export_hf(run.tuned.backbone, run.args.model, folder, normalize=run.tuned.normalize)
    return folder


def downstream_task(run, a):
    """eval.py --downstream: the speech task's linear probes on the pretrained and the tuned
    backbone, layer by layer (downstream.py); merged into analyses.json["downstream"][task]."""
    depth = len(run.pretrained.backbone.encoder.transformer.layers)
    layers = parse_layers(a.downstream_layers, depth, run.args.model)
    nets = {"pretrained": run.pretrained.backbone,
            "tuned": run.tuned.backbone if run.tuned is not None else None}
    out, table = downstream.evaluate(a.downstream, a.downstream_data, nets,
                                     model_name=run.args.model, normalize=run.pretrained.normalize,
                                     layers=layers, limit=a.downstream_limit,
                                     batch_size=run.args.infer_batch, device=run.device)
    path = os.path.join(run.folder, "analyses.json")
    saved = cache.read_json(path).get("downstream", {}) if os.path.exists(path) else {}
    cache.merge_analyses(run.folder, "downstream", dict(saved, **{a.downstream: out}))
    if a.plot:
        picture = os.path.join(run.folder, f"downstream_{a.downstream}.png")
        downstream.plot_downstream(out, a.downstream, picture)
        table += f"\nwrote {picture}"
    return table


def parse_hours(text):
    """--hours: comma-separated positive numbers of hours (an argparse type)."""
    hour = guard.number(float, low=0, low_open=True)
    hours = [hour.parse(x) for x in text.split(",")]
    if None in hours or not all(hour.holds(h) for h in hours):
        raise ValueError(f"expected hours, each {hour}, comma-separated, e.g. 0.5,1,2,4 (got "
                         f"{text!r})")
    return hours


def parser():
    p = guard.Parser(description="Analyses of a finished braintune run.")
    a = p.add_argument
    a("run", help="run folder written by train.py")
    a("--device", help="where features are computed: cpu, cuda, cuda:1 ...; default the device "
                       "the run was trained on where this machine has it (its cached features "
                       "are read back), else the CPU")
    a("--subject", help="cross-subject transfer: refit on this subject (e.g. S02)")
    a("--probe", choices=["semantic", "phones"], help="linear probe, pretrained vs tuned")
    a("--embeddings", help="word vectors, GloVe text format (default: the dataset's own)")
    a("--lowlevel", action="store_true", help="reliance on low-level (mel band) features")
    a("--seeds", nargs="+", help="more runs: mean and std of the change in r across runs")
    a("--vs", nargs="+", help="a second group of runs to compare with --seeds")
    a("--layers", nargs="?", const="all", help="the encoding r of every layer (or of 2,5,9 ...), "
                                               "pretrained and tuned")
    a("--significance", action="store_true", help="each voxel's r against zero by block "
                                                  "permutation, false discovery rate 0.05")
    a("--block", type=guard.number(int, low=1), help="TRs per block of --significance's "
                                                     "permutations (default: the run's)")
    a("--against", help="another tuned run of the same subject, test story, protocol and "
                        "baseline: the paired difference of their refit r, with its interval")
    a("--efficiency", action="store_true", help="encoding r against hours of training fMRI, "
                                                "pretrained and tuned features")
    a("--hours", type=guard.argtype(parse_hours), help="--efficiency's hours of training "
                                                       "stories, comma-separated (default: "
                                                       "doublings up to all)")
    a("--downstream", choices=sorted(tasks.TASKS), help="a speech task's linear probes, "
                                                        "pretrained and tuned, by layer")
    a("--downstream-data", help="the task's folder, in its published layout (README)")
    a("--downstream-layers", default="all", help="layers probed: all, or 2,5,9 ...")
    a("--downstream-limit", type=guard.number(int, low=1), help="at most N clips per split, for "
                                                                  "a quick look")
    a("--flatmap", action="store_true", help="flatmaps of baseline r, refit r and the change "
                                             "(pycortex)")
    a("--pycortex-db", help="the pycortex database (default: the dataset's "
                            "derivative/pycortex-db)")
    a("--plot", action="store_true", help="write PNG figures into the run folder")
    a("--export", help="write the merged tuned backbone as a torchaudio state dict here")
    a("--export-hf", help="write the tuned backbone, adapters merged, as a Hugging Face "
                          "transformers checkpoint into this new folder")
    return p


WRITES = ("subject", "probe", "lowlevel", "layers", "significance", "seeds", "against",
          "efficiency", "downstream", "flatmap", "plot")  # the analyses written into the run


def check_flags(a):
    """Every flag against the run and the files it names, before any analysis runs; returns the
    Run."""
    run = load_run(a.run, a.device)  # a clear error for a missing or incomplete run
    if a.subject:
        data.find_subject(run.args.data, a.subject)
    compare.check_groups(a.run, a.seeds, a.vs, a.against)
    if a.block is not None and not a.significance:
        raise ValueError("--block sets --significance's blocks; give --significance too")
    if a.significance:
        preflight.check_blocks(a.block or run.settings.block, preflight.list_subjects(
            run.args, run.subjects[:1]), run.settings.test_skip, whole=True)
    if a.layers is not None:
        depth = len(run.pretrained.backbone.encoder.transformer.layers)
        parse_layers(a.layers, depth, run.args.model)
    if a.embeddings:
        probes.load_embeddings(a.embeddings)  # each line, before any forward
    if a.export:
        guard.new_path(a.export, "--export")
    if a.export_hf:
        guard.new_path(a.export_hf, "--export-hf", folder=True)
        no_tuning(run)
        hf.require_transformers()
    if a.hours and not a.efficiency:
        raise ValueError("--hours sets --efficiency's subsets; give --efficiency too")
    if a.against:
        compare.comparable(run, load_other(a.against, run.device))
    if a.downstream:
        check_downstream(run, a)
    if a.flatmap:
        flatmap.check_flatmaps(run.folder, run.args.data, subject_names(run), db=a.pycortex_db)
    return run


def load_other(folder, device):
    """--against's run (a Run), on the device of the first."""
    try:
        return load_run(folder, str(device))
    except ValueError as e:
        raise ValueError(f"--against {folder}: {e}") from None


def check_downstream(run, a):
    """--downstream's flags and its task folder's layout, before any forward."""
    if not a.downstream_data:
        raise ValueError(f"--downstream {a.downstream}: give the task's folder with "
                         "--downstream-data PATH")
    depth = len(run.pretrained.backbone.encoder.transformer.layers)
    parse_layers(a.downstream_layers, depth, run.args.model)
    tasks.read_task(a.downstream, a.downstream_data, a.downstream_limit)


def subject_names(run):
    """The run's subjects as the dataset names them (UTS01, ...)."""
    return [data.find_subject(run.args.data, s) for s in run.subjects]


def main(argv=None):
    a = parser().parse_args(argv)
    cache.check_root()
    run = check_flags(a)  # the run, loaded once for every analysis of the command
    writes = any(getattr(a, k) not in (None, False) for k in WRITES)
    if writes:  # analyses.json, p-values, figures: the run folder written, by one process
        guard.writable_folder(run.folder, "the run folder")
    with guard.RunLock(run.folder) if writes else contextlib.nullcontext():
        analyses(a, run)


def analyses(a, run):
    """The analyses the flags ask for, each printed as it is done."""
    print(show(a.run))
    if a.subject:
        print(f"\ncross-subject transfer to {a.subject}:\n" + cross_subject(run, a.subject))
    if a.probe:
        _, table = probes.probe(run, a.probe, a.embeddings)
        print("\n" + table)
    if a.lowlevel:
        _, table = probes.lowlevel(run)
        print("\n" + table)
    if a.layers is not None:
        depth = len(run.pretrained.backbone.encoder.transformer.layers)
        _, table = probes.profile(run, parse_layers(a.layers, depth, run.args.model))
        print("\n" + table)
    if a.significance:
        _, table = compare.significance(run, block=a.block)
        print("\n" + table)
    if a.seeds:
        out, table = compare.stability([a.run] + a.seeds, a.vs)
        cache.merge_analyses(a.run, "stability", out)
        print("\n" + table)
    if a.against:
        out, table = compare.against(run, load_other(a.against, run.device))
        cache.merge_analyses(a.run, "against", out)
        print("\n" + table)
    if a.efficiency:
        out, table = compare.efficiency(run, a.hours)
        cache.merge_analyses(a.run, "efficiency", out)
        print("\n" + table)
    if a.downstream:
        print("\n" + downstream_task(run, a))
    if a.flatmap:
        paths = flatmap.run_flatmaps(run.folder, run.args.data, subject_names(run),
                                     db=a.pycortex_db)
        print("\nwrote " + ", ".join(paths))
    if a.plot:
        print("\nwrote " + ", ".join(plots.plot(run)))
    if a.export:
        print(f"\nwrote {export(run, a.export)}")
    if a.export_hf:
        print(f"\nwrote {write_hf(run, a.export_hf)}")


if __name__ == "__main__":
    guard.main_guard(main)
