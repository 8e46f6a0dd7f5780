"""
The voxels: --roi parsed once (Voxels), a subject's ROI files, the noise ceiling from the test
story's repeats (Schoppe et al. 2016), and the voxels stage 2 trains on (choose). As a command,
a --roi file from a file of one noise ceiling per voxel (Moussa et al.'s subject_NCs/UTS0N.npy).

    roi = parse_roi("nc0.4")                       # Voxels(kind="nc", threshold=0.4)
    results = choose(args, d, fit)                 # a ridge.Results: sets, trained voxels, baseline
    python voxels.py nc UTS01.npy --threshold 0.4 --out uts01_nc.npy    # then --roi uts01_nc.npy
"""
import os
import re
from dataclasses import dataclass

import h5py
import numpy as np

import guard
import ridge
from cache import cached, file_key, progress


def open_hf5(path):
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot read as HDF5 ({e})") from None


def noise_ceiling(repeats):
    """cc_max per voxel from (repeats, TRs, voxels) (Schoppe et al. 2016); NaN where SP <= 0."""
    N = repeats.shape[0]
    var_sum = repeats.sum(0).var(0)  # (voxels,)
    sum_var = repeats.var(1).sum(0)
    SP = (var_sum - sum_var) / (N * (N - 1))
    TP = repeats.var(1).mean(0)
    cc = 1 / np.sqrt(1 + (1 / N) * (TP / np.where(SP > 0, SP, np.nan) - 1))
    return np.where(SP > 0, cc, np.nan)


@dataclass(frozen=True)
class Voxels:
    """--roi, parsed once (parse_roi): the voxels stage 2 trains on; nothing else reads the text."""
    text: str  # as given, as config.json records it
    kind: str  # all, name (an ROI of the subject's file), top, nc or file (a .npy file)
    n: int = 0  # top: the N voxels best predicted in stage 1's cross-validation
    threshold: float = 0.0  # nc: the noise ceiling they exceed (Moussa et al.: 0.4)


def parse_roi(text):
    """--roi's text as Voxels: all, topN (N >= 1), ncT (0 <= T < 1), a .npy file or an ROI name."""
    if text == "all":
        return Voxels(text, "all")
    if text.endswith(".npy"):
        return Voxels(text, "file")
    top = re.fullmatch(r"top(\d+)", text)
    if text.startswith("top") and not (top and int(top[1]) >= 1):
        raise ValueError(f"--roi {text}: expected topN with a whole number N >= 1, all, an ROI "
                         "name or a .npy file")
    if top:
        return Voxels(text, "top", n=int(top[1]))
    nc = re.fullmatch(r"nc([\d.]+)", text)
    if nc:
        threshold = float(nc[1]) if nc[1].count(".") <= 1 and nc[1] != "." else -1.0
        if not 0 <= threshold < 1:
            raise ValueError(f"--roi {text}: expected ncT with a noise-ceiling threshold "
                             "0 <= T < 1, e.g. nc0.4")
        return Voxels(text, "nc", threshold=threshold)
    return Voxels(text, "name")


def repeats(f, path):
    """The "individual_repeats" (repeats, TRs, voxels) of an open hf5 file (at `path`), or None;
    refused in one sentence where its shape disagrees with the file's "data" (TRs, voxels)."""
    if "individual_repeats" not in f:
        return None
    reps, voxels = f["individual_repeats"], f["data"].shape[-1] if "data" in f else None
    if reps.ndim != 3 or reps.shape[0] < 2 or reps.shape[2] != voxels:
        raise ValueError(f"{path}: 'individual_repeats' has shape {reps.shape}; expected "
                         f"(repeats >= 2, TRs, voxels) with the {voxels} voxels of its 'data'")
    return reps


def story_ceiling(path, subj, block=4096):
    """The noise ceiling of every voxel from the "individual_repeats" (repeats, TRs, voxels) of
    the hf5 file `path` (the test story's), read in blocks of voxels; None if it has no repeats."""
    with open_hf5(path) as f:
        if repeats(f, path) is None:
            return None

    def build():
        with open_hf5(path) as f:
            reps = repeats(f, path)
            cc = np.empty(reps.shape[2], np.float32)
            for j in progress(range(0, len(cc), block), f"{subj} noise ceiling"):
                cc[j:j + block] = noise_ceiling(reps[:, :, j:j + block])
        return {"ceiling": cc}
    story = os.path.basename(path)[:-len(".hf5")]
    return cached("ceiling", dict(file=file_key(path), v=1), build, story)["ceiling"]


def _as_indices(arr, n_voxels, what):
    """An ROI's voxel indices, from indices or a mask: boolean, or integers of 0s and 1s with one
    repeated (a mask: indices are listed once each), either of the voxel count."""
    arr = np.asarray(arr)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all() \
            and len(np.unique(arr)) < arr.size:
        if arr.size != n_voxels:
            raise ValueError(f"{what}: holds {arr.size} 0s and 1s, a mask of the wrong length "
                             f"(the responses have {n_voxels} voxels), or indices listed twice")
        arr = arr.astype(bool)
    if arr.dtype == bool:
        if arr.shape != (n_voxels,):
            raise ValueError(f"{what}: mask has shape {arr.shape}, the responses have {n_voxels} "
                             "voxels")
        arr = np.flatnonzero(arr)
    if arr.size == 0 or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected a non-empty 1-D array of voxel indices or a boolean "
                         "mask")
    if arr.min() < 0 or arr.max() >= n_voxels:
        raise ValueError(f"{what}: indices outside 0..{n_voxels - 1}")
    return np.unique(arr)


def roi_sets(path, n_voxels):
    """{name: hf5 column indices} for every ROI in a subject's ROI file `path`
    (derivative/rois/<SUBJ>.npz; none if absent)."""
    if not os.path.exists(path):
        return {}
    rois = guard.load_array(path, None)
    if not isinstance(rois, dict):
        raise ValueError(f"{path}: an .npy array; expected an .npz of ROIs, one key each")
    return {k: _as_indices(v, n_voxels, f"{path}[{k}]") for k, v in rois.items()}


def load_roi(path, subj, voxels, n_voxels):
    """The hf5 columns of Voxels of kind all, name (an ROI of subject subj's ROI file, `path`) or
    file (a .npy file of indices or a boolean mask)."""
    if voxels.kind == "all":
        return np.arange(n_voxels)
    if voxels.kind == "file":
        if not os.path.exists(voxels.text):
            raise ValueError(f"{voxels.text}: no such ROI file")
        arr = guard.load_array(voxels.text, "--roi")
        if isinstance(arr, dict):
            raise ValueError(f"--roi {voxels.text}: an .npz archive; expected one array (np.save)")
        return _as_indices(arr, n_voxels, f"--roi {voxels.text}")
    rois = roi_sets(path, n_voxels)
    if voxels.text not in rois:
        names = "".join(", " + k for k in rois)
        raise ValueError(f"unknown ROI {voxels.text!r} for {subj}; available: all, topN, a .npy "
                         f"path{names}")
    return rois[voxels.text]


def choose(args, d, fit, roi_file):
    """Subject d's results so far (ridge.Results): its voxel sets, the voxels trained on (--roi,
    Voxels; ncT: those whose noise ceiling exceeds T; a name: of its ROI file, roi_file), the
    baseline r and its block sums (fit: its ridge.Stage1)."""
    sets = ridge.sets(d, fit.init.cv_r, args.roi.n)
    if args.roi.kind == "top":
        roi = sets[args.roi.text]
    elif args.roi.kind == "nc":
        roi = np.intersect1d(np.flatnonzero(d.ceiling > args.roi.threshold), sets["all"])
    else:
        roi = np.intersect1d(load_roi(roi_file, d.name, args.roi, len(d.good)), sets["all"])
    return ridge.Results(sets, roi, fit.baseline.test_r.numpy(), fit.baseline.blocks)


# -----------------------------------------------------------------------------
# python voxels.py nc FILE: the voxels of a noise-ceiling file, as a --roi file

def above(ceiling, threshold):
    """The voxels (hf5 columns) whose noise ceiling exceeds threshold, as Moussa et al. choose
    theirs (brain_trainer_story.py:89, np.where(sub_nc > nc_thr)); NaN is never above."""
    return np.flatnonzero(np.nan_to_num(ceiling, nan=-np.inf) > threshold)


def parser():
    p = guard.Parser(description="Voxel sets for train.py --roi.")
    nc = p.add_subparsers(dest="command", required=True).add_parser(
        "nc", help="the voxels whose noise ceiling in a file of one value per voxel exceeds "
                   "--threshold (Moussa et al.'s datasets/subject_NCs/UTS0N.npy), as a .npy "
                   "file of hf5 column indices for --roi")
    nc.add_argument("file", help="a .npy file of one noise ceiling per voxel, in hf5 column order")
    nc.add_argument("--threshold", type=guard.number(float, low=0, high=1, high_open=True),
                    default=0.4, help="voxels above it are kept (Moussa et al.'s --nc_thr: 0.4)")
    nc.add_argument("--out", required=True, help="the new .npy file of voxel indices to write")
    nc.add_argument("--against", help="the subject's test-story hf5 holding its "
                    "individual_repeats (e.g. ds003020/derivative/preprocessed_data/UTS01/"
                    "wheretheressmoke.hf5): compare with braintune's own ncT, cc_max of it")
    return p


def main(argv=None):
    """The nc command: every input checked before the file is written (atomically)."""
    a = parser().parse_args(argv)
    if not a.out.endswith(".npy"):
        raise ValueError(f"--out {a.out}: --roi reads a .npy file; give a name ending in .npy")
    guard.new_path(a.out, "--out")
    ceiling = guard.load_array(a.file, "")
    if not isinstance(ceiling, np.ndarray) or ceiling.ndim != 1 or ceiling.dtype.kind != "f":
        raise ValueError(f"{a.file}: expected one noise ceiling per voxel (a 1-D array of "
                         "floats), found " + (f"shape {ceiling.shape} of {ceiling.dtype}"
                                              if isinstance(ceiling, np.ndarray) else "a .npz"))
    ours = a.against and story_ceiling(a.against, os.path.basename(os.path.dirname(a.against)))
    if a.against and ours is None:
        raise ValueError(f"--against {a.against}: holds no 'individual_repeats', from which "
                         "braintune's noise ceiling comes")
    if a.against and len(ours) != len(ceiling):
        raise ValueError(f"{a.file}: {len(ceiling)} voxels, where --against {a.against} has "
                         f"{len(ours)}; is it the same subject's?")
    roi = above(ceiling, a.threshold)
    if not len(roi):
        raise ValueError(f"{a.file}: no voxel's noise ceiling is above {a.threshold:g}")
    with open(a.out + ".tmp", "wb") as f:
        np.save(f, roi)
    os.replace(a.out + ".tmp", a.out)
    print(f"{a.file}: {len(roi):,} of {len(ceiling):,} voxels above {a.threshold:g}; wrote "
          f"{a.out} (train.py --roi {a.out})")
    if a.against:
        own, both = above(ours, a.threshold), np.isfinite(ours) & np.isfinite(ceiling)
        r = np.corrcoef(ours[both], ceiling[both])[0, 1]
        print(f"braintune's nc{a.threshold:g} (cc_max of {a.against}'s repeats): {len(own):,} "
              f"voxels; {len(np.intersect1d(roi, own)):,} in both, "
              f"{len(np.setdiff1d(roi, own)):,} in the file's alone, "
              f"{len(np.setdiff1d(own, roi)):,} in braintune's alone; the two ceilings correlate "
              f"r = {r:.3f} over the {both.sum():,} voxels where both are finite")


if __name__ == "__main__":
    guard.main_guard(main)
