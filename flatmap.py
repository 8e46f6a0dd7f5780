"""
Flatmaps of a run's per-voxel test r with pycortex: where on the cortical sheet brain-tuning helps.

    python eval.py RUN --flatmap [--pycortex-db PATH]   # PNGs in RUN (eval.py calls run_flatmaps)

    draw_flatmaps(r, "UTS01", out_dir, db="ds003020/derivative/pycortex-db")   # one subject

Each subject gets the baseline r, the tuned (refit) r, the change (refit minus baseline) and, when
the run has --significance's p-values, the change on the voxels whose tuned r passes the false
discovery rate (ridge.fdr). The values are the subject's hf5 columns, which are the voxels where
its transform's thick mask (<db>/<SUBJ>/transforms/<SUBJ>_auto/mask_thick.nii.gz) is 1, in C order:
cortex.Volume puts them back into the volume with that mask and cortex.quickflat.make_figure draws
it (NaN voxels, those unusable, stay transparent).

pycortex is optional and imported inside the functions. Besides the PNGs, only pycortex writes:
- the subject's cache folder in the database, <db>/<SUBJ>/cache/ (or <cache>/<SUBJ>/cache/ if the
  user's pycortex config sets [basic] cache), on the first flatmap of a subject at a height:
  flatmask_<height>.npz, flatpixel_<xfm>_<height>_nearest_l32.npz (pixelwise, the default) or
  flatverts_<height>.npz and <xfm>_pointnn.npz (pixelwise=False); with a curvature underlay
  (drawn when <db>/<SUBJ>/surface-info/curvature.npz exists) also flatverts_<height>.npz;
- on its first import, pycortex's own user config ~/.config/pycortex/options.cfg
  ($XDG_CONFIG_HOME/pycortex/options.cfg when that is set), if there is none yet.
The thick mask must already be in the database: pycortex would otherwise make one (into
transforms/), and a new mask need not be the one that defined the hf5 columns. The database is
pointed at for the duration of the draw (pycortex_db) and pycortex's own is restored after.
"""
import contextlib
import os
from dataclasses import dataclass

import numpy as np

import guard
import ridge


@dataclass
class FlatMap:
    name: str           # file name, e.g. "flatmap_change_UTS01.png"
    title: str          # subject and what is drawn
    values: np.ndarray  # (voxels,) float, NaN drawn transparent
    cmap: str
    vmin: float
    vmax: float
    label: str          # the colour bar's


def import_cortex():
    """pycortex, or the one-line error of --flatmap without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # before pycortex can pull in pyplot
        import cortex
    except ImportError:
        raise ValueError("--flatmap needs pycortex: pip install pycortex") from None
    return cortex


@contextlib.contextmanager
def pycortex_db(path):
    """cortex.db reading the filestore at `path` inside the with block. Every pycortex module holds
    the one Database object (`from .database import db`, imported at module level by quickflat,
    dataset, volume, utils ...), so its state is swapped in place (filestore, the subject list,
    the memo of surfaces, a loaded Dataset's side channel) and put back afterwards; cortex.options'
    [basic] filestore is only read at import, to make that object, and is left alone."""
    cortex = import_cortex()
    store = cortex.database.db
    saved = dict(store.__dict__)
    store.__dict__.update(filestore=path, _subjects=None, _memocache={}, auxfile=None)
    try:
        yield store
    finally:
        store.__dict__.clear()
        store.__dict__.update(saved)


def flatmap_mask(db, subject, transform, n_voxels):
    """The subject's thick mask, (z, y, x) bool, from the pycortex database at `db`, with exactly
    `n_voxels` voxels (the run's hf5 columns); ValueError, naming what is missing or differs,
    before anything is drawn."""
    import_cortex()
    if not os.path.isdir(db):
        raise ValueError(f"{db}: no pycortex database there (looked for "
                         f"{os.path.join(db, subject)}); fetch it (fetch.py --pycortex) or give "
                         "--pycortex-db PATH")
    if not os.path.isdir(os.path.join(db, subject)):
        present = sorted(s for s in os.listdir(db) if os.path.isdir(os.path.join(db, s)))
        raise ValueError(f"{db}: the pycortex database has no subject {subject}; present: "
                         f"{', '.join(present) or 'none'}")
    path = os.path.join(db, subject, "transforms", transform, "mask_thick.nii.gz")
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"{path}: not fetched yet (a broken datalad link); datalad get it")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; the thick mask of transform {transform} defines "
                         f"{subject}'s hf5 columns (give the subject's transform)")
    with pycortex_db(db) as store:
        mask = store.get_mask(subject, transform, "thick")
        cache_dir = os.path.join(db, subject, "cache")
        try:
            cache_dir = store.get_cache(subject)  # made if absent
        except OSError:
            pass
    if mask.sum() != n_voxels:
        raise ValueError(f"{path}: {int(mask.sum())} voxels in {subject}'s thick mask, but the "
                         f"run has {n_voxels}; expected the database of the run's subject and "
                         "transform")
    if not (os.path.isdir(cache_dir) and os.access(cache_dir, os.W_OK)):
        raise ValueError(f"{cache_dir}: pycortex keeps its flatmap pixel maps there, and it is not "
                         "a folder it can write to; make it one")
    return mask


def robust_max(*arrays):
    """The 99th percentile of |x| over the finite values (1 when there are none or it is 0)."""
    x = np.abs(np.concatenate(arrays))
    x = x[np.isfinite(x)]
    top = float(np.percentile(x, 99)) if x.size else 0.0
    return top if top > 0 else 1.0


def flatmap_views(r, subject, fdr_mask=None, tag=""):
    """The maps of one subject: the two r on one scale from 0, the change on a symmetric one."""
    base = np.asarray(r["baseline_r"], np.float64)  # (voxels,)
    refit = np.asarray(r["refit_r"], np.float64)  # (voxels,)
    change = refit - base  # (voxels,)
    top, step = robust_max(base, refit), robust_max(change)
    diff = "tuned r - baseline r"
    maps = [FlatMap(f"flatmap_baseline{tag}.png", f"{subject}: baseline r (pretrained)", base,
                    "inferno", 0.0, top, "test r"),
            FlatMap(f"flatmap_refit{tag}.png", f"{subject}: tuned r (ridge refit)", refit,
                    "inferno", 0.0, top, "test r"),
            FlatMap(f"flatmap_change{tag}.png", f"{subject}: change in r (tuned - baseline)",
                    change, "RdBu_r", -step, step, diff)]
    if fdr_mask is not None:
        kept = np.where(fdr_mask, change, np.nan)  # (voxels,)
        maps.append(FlatMap(f"flatmap_change_fdr{tag}.png", f"{subject}: change in r where the "
                            "tuned r passes FDR", kept, "RdBu_r", -step, step, diff))
    return maps


def flatmap_volume(m, subject, transform, mask):
    """A FlatMap as a cortex.Volume: the (voxels,) values into the voxels where the (z, y, x) mask
    is True, in C order (the hf5 columns), the rest of the volume masked out."""
    cortex = import_cortex()
    assert m.values.shape == (int(mask.sum()),)
    return cortex.Volume(m.values, subject, transform, mask=mask, cmap=m.cmap, vmin=m.vmin,
                         vmax=m.vmax)


def save_flatmap(vol, m, path, *, height, pixelwise, curvature):
    """One flatmap PNG: the map (over the curvature if asked), its colour bar and its title, the
    title also in the PNG's metadata (Title)."""
    cortex = import_cortex()
    import matplotlib.pyplot as plt
    fig = plt.figure()
    ax = fig.add_axes((0.0, 0.2, 1.0, 0.7))
    cortex.quickflat.make_figure(vol, fig=ax, height=height, pixelwise=pixelwise, with_rois=False,
                                 with_colorbar=False, with_curvature=curvature)
    data = [im for im in ax.get_images() if im.get_label() == "data"][0]
    rows, cols = data.get_size()  # the flatmap's pixels
    dpi = rows / (0.7 * 5)  # 5 inches tall: the same text size at every height
    fig.set_size_inches(cols / dpi, 5)
    bar = fig.colorbar(data, cax=fig.add_axes((0.3, 0.11, 0.4, 0.035)), orientation="horizontal",
                       extend="both")
    bar.set_label(m.label)
    fig.suptitle(m.title, y=0.97)
    fig.savefig(path, dpi=dpi, facecolor="white", metadata={"Title": m.title})
    plt.close(fig)
    return path


def draw_flatmaps(r, subject, out_dir, *, db, transform=None, fdr_mask=None, tag="", height=1024,
                  pixelwise=True):
    """PNG flatmaps of one subject's r = {"baseline_r": (voxels,), "refit_r": (voxels,)} into
    out_dir, through the pycortex database at `db` (transform default <subject>_auto); fdr_mask
    (voxels,) bool adds the change on those voxels (eval: ridge.fdr(refit_p, 0.05)). height: the
    flatmap's, in pixels; pixelwise=False samples at vertices (quicker to cache). Returns the
    paths."""
    transform = transform or f"{subject}_auto"
    n = len(r["baseline_r"])
    assert len(r["refit_r"]) == n and (fdr_mask is None or len(fdr_mask) == n)
    mask = flatmap_mask(db, subject, transform, n)
    curvature = os.path.isfile(os.path.join(db, subject, "surface-info", "curvature.npz"))
    paths = []
    with pycortex_db(db):
        for m in flatmap_views(r, subject, fdr_mask, tag):
            vol = flatmap_volume(m, subject, transform, mask)
            paths.append(save_flatmap(vol, m, os.path.join(out_dir, m.name), height=height,
                                      pixelwise=pixelwise, curvature=curvature))
    return paths


def subject_maps(npz, subjects):
    """{subject: {key: (voxels,)}} from a run's voxel_r.npz: keys '<SUBJ>.refit_r' when the run
    has several subjects, plain 'refit_r' when it has one."""
    if len(subjects) == 1:
        return {subjects[0]: {k: np.asarray(npz[k]) for k in npz}}
    return {s: {k[len(s) + 1:]: np.asarray(npz[k]) for k in npz if k.startswith(s + ".")}
            for s in subjects}


def check_flatmaps(run, data_root, subjects, *, db=None):
    """Everything --flatmap needs, before any drawing: pycortex, the run's tuned r and, for every
    subject, the database's subject and a thick mask of the run's voxel count. Returns
    {subject: r} (with 'fdr', the voxels whose tuned r passes FDR at 0.05, where the run has
    --significance's p-values) and the database's path (default: the dataset's
    derivative/pycortex-db)."""
    db = db or os.path.join(data_root, "derivative", "pycortex-db")
    maps = subject_maps(guard.load_array(os.path.join(run, "voxel_r.npz"), None), subjects)
    for subj, r in maps.items():
        if "refit_r" not in r:
            raise ValueError(f"{run} is a stage-1 run (--epochs 0): there is no tuned r to map")
        flatmap_mask(db, subj, f"{subj}_auto", len(r["refit_r"]))
        if "refit_p" in r:
            r["fdr"] = ridge.fdr(r["refit_p"], 0.05)
    return maps, db


def run_flatmaps(run, data_root, subjects, *, db=None, height=1024, pixelwise=True):
    """eval.py --flatmap: the flatmaps of each of the run's subjects (the dataset's names, e.g.
    UTS01) into the run folder; returns the paths."""
    maps, db = check_flatmaps(run, data_root, subjects, db=db)
    paths = []
    for subj, r in maps.items():
        tag = f"_{subj}" if len(subjects) > 1 else ""
        paths += draw_flatmaps(r, subj, run, db=db, fdr_mask=r.get("fdr"), tag=tag, height=height,
                               pixelwise=pixelwise)
    return paths
