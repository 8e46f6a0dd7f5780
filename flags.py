"""
train.py's flags, each with its help and each number's range (guard.number), and the papers'
recipes that set their defaults (README: the recipes; docs/training.md says where each value comes
from). A new flag goes here (docs/contributing.md); config.parse reads them once.

    p = parser()                  # every flag of train.py
    RECIPES["brainwavlm"]         # {flag: value} as the authors' code runs it
"""
import re

import numpy as np

import data
import guard
from features import PROTOCOLS
from guard import number
from model import BUNDLES, POOLS

# Moussa et al.'s training stories, as named in their train_stories_25 (dataset.py:121); their
# published loop indexes another list by position (docs/training.md: the index bug): the names
# are meant
MOUSSA_STORIES = ("souls howtodraw alternateithicatom hangtime swimmingwithastronauts eyespy "
                  "itsabox myfirstdaywiththeyankees legacy theclosetthatateeverything "
                  "haveyoumethimyet thatthingonmyarm undertheinfluence avatar tildeath naked "
                  "fromboyhoodtofatherhood adollshouse odetostepfather adventuresinsayingyes "
                  "sloth exorcism buck inamoment").replace(" ", ",")
# the papers' values, as their authors' code runs them (README: the recipes; docs/training.md
# says where each comes from); the command line still wins
RECIPES = {
    # the laptop demo (the default with the tiny model): layer 2 of 4 and 4 TRs make a step 3x
    # cheaper than layer 3 and 6 TRs; rank 64 is tiny's whole width (docs/training.md: the demo),
    # and alpha / rank = 8 at lr 3e-3 moves its attention far enough in 7 epochs
    "demo": dict(tiny_pretrain=2, layer="2", history=4, lora_rank=64, lora_alpha=512.0,
                 lora_dropout=0.0, lora_targets="qkv", lr=3e-3, head_lr=1e-3, warmup=0.2, clip=0.0,
                 epochs=7, patience=7),
    "li2024": dict(model="wav2vec2_base", layer="weighted", history=6, lora_rank=0, loss="mse",
                   l2=1e-4, lr=1e-5, head_lr=1e-4),
    "moussa2025": dict(model="hubert_base", layer="12", history=5, lora_rank=0, loss="mse", l2=0.0,
                       lr=5e-5, head_lr=1e-4, batch_size=128, epochs=21, patience=30, warmup=5,
                       schedule="moussa2025", clip=0.0, backbone_dropout=0.0, pool="mean",
                       roi="nc0.4", train_stories=MOUSSA_STORIES, val_stories="stagefright",
                       protocol="moussa2025", select="6,11,21", tune="feature-projection",
                       head_input="raw", precision="fp32"),
    "brainwavlm": dict(model="wavlm_base_plus", layer="9", history=4, lora_rank=4, lora_alpha=4.0,
                       lora_dropout=0.0, lora_targets="qkv", loss="corr", lr=1e-4, head_lr=1e-4,
                       epochs=20, patience=20, warmup=0.0, clip=0.0, select="refit",
                       bottleneck=100, val_stories="fromboyhoodtofatherhood,stagefright",
                       protocol="brainwavlm", frame="first", test_skip=0, lag=1,
                       mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2,
                       layer_drop=0.05, precision="fp32"),
}
# what --resume may change: what is left to do, and how it runs, not what was done
STEERING = ("epochs", "patience", "device", "precision", "batch_size", "accum", "infer_batch",
            "no_cache")


RATE = number(float, low=0, low_open=True)  # a learning rate
DROPOUT = number(float, low=0, high=1, high_open=True)
MAX_LAMBDAS = 10 ** 6  # a finer grid than this is no grid: its memory is checked (preflight)


def parser():
    """train.py's flags, each with its help and each number's range (guard.number); the data, the
    model and the evaluation here, stage 2's and the run's in run_flags."""
    p = guard.Parser(description="Brain-tuning of a speech model on fMRI responses to stories.")
    a = p.add_argument
    a("--subject", default="S01", help="subject, e.g. S01 or UTS01; several, comma-separated "
                                       "(S01,S02,S03), tune one backbone with a head for each")
    a("--roi", default="all", help="voxels to train on: all, an ROI name, a .npy file (voxel "
      "indices, or a mask of the voxel count: boolean or 0/1), topN (stage-1 cv r) or ncT (noise "
      "ceiling above T, from the test story's repeats; Moussa et al.: nc0.4)")
    a("--data", default=None, help="dataset folder (ds003020 layout); default: the synthetic "
                                   "one, made if absent")
    a("--drop-nonfinite-voxels", action="store_true", help="leave out the voxels whose responses "
      "hold NaN or inf in some story (without it such a file is refused, its rows named)")
    a("--recipe", choices=sorted(RECIPES), help="set the defaults to one paper's recipe (README)")
    a("--model", default=None, help=f"tiny or {', '.join(BUNDLES)}; default tiny on synthetic "
                                    "data, wavlm_base_plus on a real dataset")
    a("--weights", default=None, help="local state dict for --model instead of the torchaudio "
                                      "download")
    a("--tiny-pretrain", type=number(int, low=0), default=4, help="epochs of tiny's phone "
      "pretraining on the training stories (its stand-in for self-supervised pretraining); 0: "
      "random")
    a("--layer", default=None, help="transformer layer read (1-based; default 3/4 of the depth, "
      "9 of 12) or 'weighted' (learned weighted sum of all layers, Li et al.)")
    a("--history", type=number(int, low=1), default=6, help="TRs of audio before each fMRI frame "
                                                           "(Li et al.: 6)")
    a("--lag", type=number(int, low=0), default=0, help="TRs from the end of each window to its "
      "fMRI frame: the --history bins cover lags lag..lag+history-1 TRs (BrainWavLM's delays 1-4: "
      "--history 4 --lag 1)")
    a("--pool", choices=list(POOLS), default="bins", help="the head's input: bins (the window's "
      "frames averaged in --history TR bins) or mean (the mean of all its frames, Moussa et al.)")
    a("--tr", type=number(float, low=0, low_open=True), default=data.TR, help="seconds per fMRI "
                                                                             "frame")
    a("--trim-start", type=number(int, low=0), default=data.TRIM_START, help="TRs dropped at the "
                                                                            "start of each run")
    a("--sound-start", type=number(float), default=data.SOUND_START, help="seconds from run start "
                                                                         "to audio start")
    a("--test-stories", default=None, help="comma-separated test stories (default: "
                                           "wheretheressmoke)")
    a("--val-stories", default=None, help="comma-separated validation stories (default: "
                                          "stagefright when present, else the last training story)")
    a("--train-stories", default=None, help="the training stories, comma-separated or a text file "
      "of one story per line (default: every story that is not a test or validation story)")
    a("--protocol", choices=sorted(PROTOCOLS), default="windows", help="the features that stage "
      "1's baseline, the refit and eval.py's fits are scored with: windows (the training input) "
      "or a paper's (moussa2025, brainwavlm: a sliding context, Lanczos to the TRs, delays 1-4)")
    a("--context", type=number(float, low=0), default=None, help="seconds heard before each "
                                                                "stride (moussa2025 16, "
                                                                "brainwavlm 3.75)")
    a("--stride", type=number(float, low=0, low_open=True), default=None, help="seconds between "
      "the ends of the feature windows (0.1, 0.25)")
    a("--frame", choices=["last", "first"], default="last", help="the frames kept of each "
      "protocol snippet: last (those of its last stride) or first (its first frame, labelled at "
      "the snippet's end: BrainWavLM's code)")
    a("--delays", default=None, help="TR delays of the protocol's features, comma-separated (the "
                                     "papers: 1,2,3,4)")
    a("--test-skip", type=number(int, low=0), default=None, help="rows left out of each test "
      "story's score at its start (the papers: 40; windows: 0)")
    a("--block", type=number(int, low=1), default=10, help="TRs per block of the test story's "
                                                          "bootstrap (the change's interval)")
    a("--cv-folds", type=number(int, low=2), default=None, help="ridge cross-validation folds, "
      "each a group of whole stories (default 5, or one per training story if there are fewer)")
    a("--alphas", type=guard.argtype(lambdas), default="1e-1,1e8,19", help="ridge lambda grid: "
      "first,last,count (log-spaced)")
    run_flags(p.add_argument_group("stage 2 and the run").add_argument)
    return p


def run_flags(a):
    """Stage 2's flags and the run's (a: add_argument of their group)."""
    a("--bottleneck", type=number(int, low=0), default=0, help="head through K units, "
                                                              "initialised by rank-K ridge weights")
    a("--lora-rank", type=number(int, low=0), default=4, help="LoRA rank (BrainWavLM: 4); 0 = "
                                                             "tune the whole transformer")
    a("--lora-alpha", type=number(float, low=0, low_open=True), default=4.0, help="LoRA alpha; "
      "scaling = alpha / rank (BrainWavLM: 4)")
    a("--lora-dropout", type=DROPOUT, default=0.1, help="dropout on the adapters' input "
                                                       "(BrainWavLM: 0.1)")
    a("--lora-targets", default="qkv", help="projections to adapt, letters of qkvo (BrainWavLM: "
                                            "qkv)")
    a("--backbone-dropout", type=DROPOUT, default=None, help="the backbone's own dropout "
      "(attention, hidden, projection) in stage 2; default the bundle's (0.1; tiny 0); 0 makes a "
      "CPU step about 1.3x faster (bench.py)")
    a("--layer-drop", type=guard.number(float, low=0, high=1, high_open=True), default=0.0,
      help="LayerDrop in stage 2, as a Hugging Face model in train mode: each layer skipped with "
      "this probability in a step (BrainWavLM's WavLM: 0.05)")
    a("--mask-time-prob", type=guard.number(float, low=0, high=1), default=0.0, help="SpecAugment "
      "in stage 2, as Hugging Face's: spans of --mask-time-length frames after the feature "
      "projection set to zero, about this share of each window (BrainWavLM's WavLM: 0.05)")
    a("--mask-time-length", type=guard.number(int, low=1), default=10, help="frames per span")
    a("--mask-time-min-masks", type=guard.number(int, low=0), default=2, help="spans per window at "
      "least, where --mask-time-prob is above 0")
    a("--tune", choices=["transformer", "feature-projection"], default="transformer", help="what "
      "trains beside the heads: the adapters (or with --lora-rank 0 the transformer), or that and "
      "the feature projection from the CNN to the transformer (Moussa et al.: only the CNN frozen)")
    a("--head-input", choices=["zscored", "raw"], default="zscored", help="what the heads read: "
      "the pooled features z-scored by stage 1's moments, or raw (Moussa et al.), the heads' "
      "weights and bias folded so that they start as the same function")
    a("--loss", choices=["mse", "corr"], default="mse", help="mse (Li et al.) or corr (BrainWavLM)")
    a("--l2", type=number(float, low=0), default=0.0, help="L2 penalty on the head's weights (Li "
                                                          "et al.)")
    a("--lr", type=RATE, default=1e-4, help="learning rate of the adapters (or the transformer)")
    a("--head-lr", type=RATE, default=1e-4, help="learning rate of the head")
    a("--warmup", type=number(float, low=0), default=1.0, help="epochs of linear learning-rate "
                                                              "warm-up")
    a("--schedule", choices=["warmup", "moussa2025"], default="warmup", help="warmup: --warmup "
      "epochs of linear warm-up per step, then constant; moussa2025: per epoch, the backbone's lr "
      "x epoch/5 to epoch 5 then down to 0 at epoch 30, the head's x max(0.8^epoch, 0.1)")
    a("--clip", type=number(float, low=0), default=1.0, help="gradient-norm clipping; 0: none")
    a("--batch-size", type=number(int, low=1), default=16, help="windows per optimiser step "
                                                               "(global, across processes)")
    a("--accum", type=number(int, low=1), default=1, help="batches accumulated per optimiser step")
    a("--infer-batch", type=number(int, low=1), default=16, help="windows, or a protocol's "
      "chunks, forwarded at once where features are extracted (stage 1, validation, the refit, "
      "eval.py): sized for memory apart from --batch-size")
    a("--epochs", type=number(int, low=0), default=20, help="stage-2 epochs; 0 stops after stage "
      "1 (the baseline); with --resume, extends the run")
    a("--patience", type=number(int, low=1), default=3, help="stop after this many epochs "
                                                            "without a better validation r")
    a("--select", type=guard.argtype(selection), default="val", help="the epoch kept: val (the "
      "best validation r of the trained heads), refit (of a ridge refit on the training stories' "
      "features, scored on the validation stories; the pretrained backbone a candidate), last, "
      "or epochs, comma-separated (6,11,21: the models after 6, 11 and 21 epochs, each scored on "
      "the test story, the last kept; Moussa et al.); last and a list never stop early")
    a("--control", choices=["none", "permuted"], default="none", help="permuted: stage 2 trains "
      "on each training and validation story's responses with blocks of --control-block TRs "
      "permuted within the story (the permuted-brain control); the test story is always real")
    a("--control-block", type=number(int, low=1), default=10, help="TRs per permuted block of "
                                                                  "--control permuted (1: single "
                                                                  "TRs)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda when available")
    a("--precision", choices=["auto", "fp32"], default="auto", help="auto: the backbone in bf16 "
      "autocast on a GPU, float32 on a CPU; fp32: float32 everywhere (the ridge is always "
      "float32)")
    a("--seed", type=number(int, low=0, high=2 ** 32 - 1), default=0, help="random seed")
    a("--out", default=None, help="run folder (default runs/<subject>_<roi>_<model>_<time>)")
    a("--resume", default=None, help="continue the run in this folder from its last finished "
      "epoch; only " + ", ".join("--" + k.replace("_", "-") for k in STEERING) + " may be given "
      "with it (the batch's two keep the global batch), and any other flag only with the run's "
      "own value")
    a("--force", action="store_true", help="replace an existing run folder (only a run folder) "
      "with the new run, whole, once the new run has finished")
    a("--no-cache", action="store_true", help="keep nothing in $BRAINTUNE_CACHE (default .cache): "
      "responses, audio, features and stage-1 fits are made again and deleted at exit")


def selection(text):
    """--select's text: val, refit, last, or epochs from 1 up, comma-separated and increasing."""
    epochs = [int(x) for x in text.split(",")] if re.fullmatch(r"\d+(,\d+)*", text) else [0]
    if text not in ("val", "refit", "last") and (epochs[0] < 1 or sorted(set(epochs)) != epochs):
        raise ValueError("expected val, refit, last, or epochs from 1 up, comma-separated and "
                         f"increasing (e.g. 6,11,21), not {text!r}")
    return text


def lambdas(text):
    """--alphas first,last,count: the ridge's lambdas, log-spaced (an argparse type)."""
    kinds = (RATE, RATE, number(int, low=1, high=MAX_LAMBDAS))
    parts = text.split(",")
    values = [k.parse(x) for k, x in zip(kinds, parts)]
    ok = len(parts) == 3 and all(v is not None and k.holds(v) for k, v in zip(kinds, values))
    if not ok or values[0] > values[1]:
        raise ValueError(f"expected first,last,count: lambdas {RATE}, first <= last, and a count "
                         f"{kinds[2]}, e.g. 1e-1,1e8,19 (got {text!r})")
    return np.logspace(np.log10(values[0]), np.log10(values[1]), values[2]).tolist()
