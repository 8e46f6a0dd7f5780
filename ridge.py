"""
Ridge regression and the statistics that the results report: the encoding model's per-voxel fit
(closed form, a lambda per voxel chosen by cross-validation over whole stories), one subject's
encoding fit and its stage 1, the voxel sets, Pearson r, the block bootstrap of the change between
two models, the block permutation test and the false discovery rate, and the results table.

    fit = fit_ridge(X, Y, alphas, story_folds([len(s) for s in stories], 5))  # fit.W (p, voxels)
    fit = fit_encoding(X, d, Settings(alphas, folds=5, block=10, test_skip=0))       # a RidgeFit
"""
import functools
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from cache import cached, log, progress


@dataclass
class BlockSums:
    """The test story's sums in blocks of TRs, from which each bootstrap resample's r is rebuilt."""
    sums: torch.Tensor  # (blocks, 5, voxels) float64: sums of p, y, p*p, y*y, p*y
    rows: torch.Tensor  # (blocks,) float64: TRs in each block


@dataclass
class RidgeFit:
    """One encoding model: features z-scored by (mu, sd), then W; as himalaya names its parts."""
    mu: torch.Tensor  # (p,) feature means of the training rows
    sd: torch.Tensor  # (p,)
    W: torch.Tensor  # (p, voxels)
    cv_r: torch.Tensor  # (voxels,) cross-validated r on the training stories; NaN where unusable
    test_r: torch.Tensor  # (voxels,) on the test story, from row --test-skip on; NaN where unusable
    blocks: BlockSums  # the test story's block sums, for the change's interval


@dataclass
class RidgeCV:
    """A per-voxel ridge solved with cross-validated lambdas (fit_ridge), on the CPU."""
    W: torch.Tensor  # (p, voxels)
    lambdas: torch.Tensor  # (voxels,) each voxel's lambda
    cv_r: torch.Tensor  # (voxels,) each voxel's cross-validated r at its lambda


@dataclass
class Settings:
    """How a run fits and scores every encoding model (the run's flags)."""
    alphas: list  # the lambdas tried, (--alphas)
    folds: int  # cross-validation folds of whole training stories (--cv-folds)
    block: int  # TRs per block of the test story's bootstrap (--block)
    test_skip: int  # rows left out at each test story's start (--test-skip)


@dataclass
class Stage1:
    """One subject's stage 1 on the frozen backbone."""
    init: RidgeFit  # on the windows: the head's initialisation, and what topN ranks
    baseline: RidgeFit  # what the baseline is scored by: init itself, or under --protocol


@dataclass
class Results:
    """One subject's results: its voxel sets, the voxels trained on, and each model's r."""
    sets: dict  # {name: (n,) voxel indices}: all, each ROI, topN
    roi: np.ndarray  # (n,) the voxels trained on (--roi)
    baseline_r: np.ndarray  # (voxels,) the pretrained backbone's test r
    baseline_blocks: BlockSums
    tuned_r: np.ndarray = None  # (voxels,) the tuned model's own heads; NaN off the trained voxels
    refit_r: np.ndarray = None  # (voxels,) the tuned backbone, ridge refit
    refit_blocks: BlockSums = None
    epochs: dict = field(default_factory=dict)  # {epoch: Results}: each other --select epoch

    def at(self, epoch):
        """These results' copy for another epoch --select names (6,11,21), kept in .epochs."""
        return self.epochs.setdefault(epoch, Results(**dict(vars(self), epochs={})))

    def r(self):
        """{"baseline_r", "tuned_r", "refit_r"}: the per-voxel r there are (voxel_r.npz's keys)."""
        names = ("baseline_r", "tuned_r", "refit_r")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def fit_state(fit):
    """A RidgeFit as a dict of tensors with named keys (stage1.pt); no tensor is copied."""
    state = {f.name: getattr(fit, f.name) for f in fields(RidgeFit) if f.name != "blocks"}
    return dict(state, block_sums=fit.blocks.sums, block_rows=fit.blocks.rows)


def fit_from_state(state):
    """fit_state's dict back as a RidgeFit."""
    blocks = BlockSums(state["block_sums"], state["block_rows"])
    names = [f.name for f in fields(RidgeFit) if f.name != "blocks"]
    return RidgeFit(**{k: state[k] for k in names}, blocks=blocks)

# -----------------------------------------------------------------------------
# the ridge

def moments(x):
    """The mean and standard deviation of each column of x (rows, p), the deviation at least 1e-6
    so that a constant feature stays 0: every feature matrix here is z-scored as (x - mu) / sd
    by its training rows' moments."""
    return x.mean(0), x.std(0).clamp_min(1e-6)


def pearson(a, b):
    """Per-column Pearson r of (n, v) tensors; a constant column gives 0, not NaN."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)


def full_float32(fn):
    """fn with TF32 off for CUDA matmuls, whatever the rest of the run uses: a 10-bit mantissa would
    move the lambdas that cross-validation chooses and the weights."""
    @functools.wraps(fn)
    def wrapped(*a, **k):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return fn(*a, **k)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return wrapped


def gram(X, rows):
    """(p, p) X'X of the given rows in float64: in float32, eigh loses the small eigenvalues."""
    return X[rows].double().T @ X[rows].double()


@full_float32
def fit_ridge(X, Y, alphas, groups, voxel_batch=None):
    """Ridge ||XW - Y||^2 + lambda ||W||^2 with its own lambda per voxel, chosen by
    cross-validation.

    X (n, p) on the device that does the work; Y (n, v) a tensor or a data.Responses, read one
    batch of voxels at a time (about 256 MB), each sent to X's device in turn. alphas are lambdas
    (the Huth lab's bootstrap_ridge squares its alpha: its alpha a is lambda = a**2 here); groups
    (n,) fold labels, each held out once (whole stories). Each voxel takes the lambda with the best
    mean held-out r (ties: the larger lambda), then W is refit on all rows. No intercept: inputs
    are z-scored. Returns a RidgeCV: W (p, v), each voxel's lambda and its cross-validated r at
    that lambda (v,), on the CPU.

    Each fold's training Gram matrix X'X = V diag(e) V' (float64) gives every lambda's weights as
    V B with B = diag(1 / (e + lambda)) V'X'Y. The held-out r needs no prediction: with Xc the
    fold's centred rows in V's basis, cov = sum(B * Xc'Y) and var = ||Xc B||^2."""
    assert X.ndim == 2 and len(X) == Y.shape[0] == len(groups), "X, Y, groups must align"
    (n, p), dev, dt = X.shape, X.device, X.dtype
    alphas = torch.as_tensor(sorted(alphas), dtype=dt, device=dev)
    groups = torch.as_tensor(np.asarray(groups), device=dev)
    folds = [torch.nonzero(groups == g).squeeze(1) for g in groups.unique()]
    assert len(folds) >= 2, "cross-validation needs at least two groups"
    G = sum(gram(X, te) for te in folds)
    decs = []  # per fold: held-out rows, e, V, and Xc (held-out rows <= p) or Xc'Xc
    for te in progress(folds, "ridge folds"):
        e, V = torch.linalg.eigh(G - gram(X, te))
        Xc = (X[te] - X[te].mean(0)) @ V.to(dt)  # (n_te, p)
        decs.append((te, e.clamp_min(0).to(dt), V.to(dt), Xc if len(te) <= p else Xc.T @ Xc))
    e, V = torch.linalg.eigh(G)
    e, V = e.clamp_min(0).to(dt), V.to(dt)
    v = Y.shape[1]
    vb = voxel_batch or voxels_at_once(n, p, len(folds))
    W = torch.empty(p, v, dtype=dt)
    best, cv = torch.empty(v, dtype=torch.long), torch.empty(v, dtype=dt)
    for j in progress(range(0, v, vb), f"ridge, {v} voxels", total=-(-v // vb)):
        Yb = torch.as_tensor(Y[:, j:j + vb]).to(dev, dt)  # (n, vb)
        XY = [X[te].T @ Yb[te] for te, *_ in decs]  # (p, vb): each fold's X'Y
        XtY = sum(XY)
        scores = torch.zeros(len(alphas), Yb.shape[1], dtype=dt, device=dev)
        for (te, e_, V_, S), xy in zip(decs, XY):
            Yte, small = Yb[te], len(te) <= p
            A = V_.T @ (XtY - xy)  # (p, vb): V'X'Y over the fold's training rows
            if small:
                Z = S.T @ Yte  # (p, vb): Xc'Y
            else:
                Z = V_.T @ (xy - X[te].sum(0)[:, None] * Yte.mean(0))
            inv = 1 / (e_[None] + alphas[:, None])  # (alphas, p)
            cov = inv @ (A * Z)  # (alphas, vb)
            var = torch.empty_like(cov)  # filled in place: no small tensor per lambda outlives
            for k, i in enumerate(inv):  # its (p, vb) B, which would fragment the heap
                B = A * i[:, None]
                var[k] = ((S @ B).square() if small else B * (S @ B)).sum(0)
            ss = (Yte - Yte.mean(0)).square().sum(0)
            scores += cov / (var.clamp_min(0) * ss).sqrt().clamp_min(1e-12)
        # argmax takes the first max: flipped, the largest lambda
        b = len(alphas) - 1 - scores.flip(0).argmax(0)
        W[:, j:j + vb] = (V @ ((V.T @ XtY) / (e[:, None] + alphas[b]))).cpu()
        best[j:j + vb] = b.cpu()
        cv[j:j + vb] = scores.gather(0, b[None])[0].cpu() / len(folds)
    return RidgeCV(W, alphas.cpu()[best], cv)


def voxels_at_once(n, p, folds):
    """The batch of voxels fit_ridge solves at once for n rows, p features and `folds` folds: its
    responses and each fold's X'Y, about 256 MB."""
    return max(256, min(16384, 2 ** 26 // (n + (folds + 5) * p)))


def story_folds(lengths, k):
    """Fold label per row: story i (of the given row counts) goes to fold i mod k, whole."""
    return np.concatenate([np.full(n, i % k) for i, n in enumerate(lengths)])


def scored_rows(d, skip):
    """The test rows a score counts: each test story's from row `skip` on (the papers drop 40)."""
    starts, ends = d.Y["test"].starts, d.windows["test"].ends
    return np.concatenate([np.arange(s + skip, s + len(e)) for s, e in zip(starts, ends)])


def fit_encoding(X, d, settings, device=torch.device("cpu"), stats=None):
    """Frozen features X {"train", "test"} (rows, p) of one subject (data.Subject d) -> its
    per-voxel ridge, a RidgeFit. The features are z-scored by stats (mu, sd), by default the
    training rows' own; lambdas from settings.alphas, by settings.folds-fold cross-validation over
    whole training stories (story_folds); the test r (NaN for unusable voxels) and the test story's
    sums in blocks of settings.block TRs (block_sums), both from each test story's row
    settings.test_skip on. The fit is cached under all that it depends on (the features themselves,
    the responses' files, lambdas, folds), so a second run does not redo it."""
    mu, sd = stats or moments(X["train"])
    Z = {s: (x - mu) / sd for s, x in X.items()}
    skip, block = settings.test_skip, settings.block
    groups = story_folds([len(e) for e in d.windows["train"].ends], settings.folds)
    lengths = [len(e) - skip for e in d.windows["test"].ends]
    scored = scored_rows(d, skip)
    fitted = []

    def fit():
        t0 = time.time()
        fitted.append(t0)
        solved = fit_ridge(Z["train"].to(device), d.Y["train"], settings.alphas, groups)
        W, lambdas, cv = solved.W, solved.lambdas, solved.cv_r
        r, sums = [], []  # test r, and each block of test TRs' sums for the bootstrap
        for j in range(0, W.shape[1], 16384):
            pred, y = Z["test"][scored] @ W[:, j:j + 16384], d.Y["test"][scored, j:j + 16384]
            r.append(pearson(pred, y))
            sums.append(block_sums(pred, y, lengths, block))
        r = torch.cat(r)
        good = torch.as_tensor(d.good)
        alphas = settings.alphas
        edge = ((lambdas == min(alphas)) | (lambdas == max(alphas)))[good].float()
        responsive = cv[good] > 0.1  # unresponsive voxels rightly take the largest lambda
        share = 100 * edge[responsive].mean() if responsive.any() else 0
        log(f"{d.name} ridge: {good.sum()} voxels in {time.time() - t0:.1f} s; at an edge of the "
            f"lambda grid: {100 * edge.mean():.1f}% of voxels, {share:.1f}% of those with "
            "cv r > 0.1")
        cv[~good], r[~good] = float("nan"), float("nan")
        return {"W": W.numpy(), "cv": cv.numpy(), "r": r.numpy(),
                "sums": torch.cat([b.sums for b in sums], -1).numpy(), "rows": sums[0].rows.numpy()}
    key = dict(X=Z, Y=[d.Y[s].keys for s in ("train", "test")], good=d.good, alphas=settings.alphas,
               groups=groups, block=block, skip=skip, device=device.type, v=1)
    e = cached("stage1", key, fit, d.name) if d.Y["train"].keys else fit()
    if not fitted:
        log(f"{d.name} ridge: read from the cache (the same features, responses and settings as an "
            "earlier run)")
    W, cv, r, sums, rows = (torch.from_numpy(np.asarray(e[k])) for k in ("W", "cv", "r", "sums",
                                                                         "rows"))
    return RidgeFit(mu, sd, W, cv, r, BlockSums(sums, rows))


def sets(d, cv, top=0):
    """The voxel sets the results are reported on: all, each ROI of the subject, and the top N by
    stage-1 cv r (N: `top`, --roi topN's, else a tenth of the usable voxels)."""
    return voxel_sets(d.good, d.rois, cv, top)


def voxel_sets(good, rois, cv, top=0):
    """sets of a subject given its usable voxels good (voxels,) bool and its ROIs {name: (n,)
    indices}."""
    good = np.flatnonzero(good)
    n_top = top or max(1, len(good) // 10)
    top = good[np.argsort(-np.asarray(cv)[good], kind="stable")[:n_top]]
    rois = {k: np.intersect1d(v, good) for k, v in rois.items()}
    return {"all": good, **rois, f"top{n_top}": top}

# -----------------------------------------------------------------------------
# the results: each set's mean r, the change's interval, each voxel's significance

def block_sums(p, y, lengths, block=10):
    """What a block bootstrap of r needs (BlockSums): each block's sums of p, y, p^2, y^2 and p*y,
    and its TRs, in blocks of `block` consecutive TRs within each story of `lengths` rows."""
    firsts = np.cumsum([0] + list(lengths[:-1]))  # each story's first row
    edges = [e for s, n in zip(firsts, lengths) for e in range(s, s + n, block)]
    rows = torch.as_tensor(np.diff(edges + [int(sum(lengths))]))
    ids = torch.repeat_interleave(torch.arange(len(rows)), rows)  # (TRs,) the block of each TR
    p, y = p.double(), y.double()
    sums = [torch.zeros(len(rows), p.shape[1], dtype=torch.float64).index_add_(0, ids, x)
            for x in (p, y, p * p, y * y, p * y)]  # one (TRs, voxels) product at a time
    return BlockSums(torch.stack(sums, 1), rows.double())


def bootstrap_means(blocks, sets_, resamples=1000, seed=0, chunk=20):
    """Each set's mean r under each model, (resamples, sets, models), in a block bootstrap of the
    test story: its blocks of TRs drawn with replacement (neighbouring TRs are correlated), the
    same draws for every model, every voxel's r recomputed from the block sums. blocks: a
    BlockSums per model, all of the same blocks."""
    n = blocks[0].rows
    assert all(torch.equal(b.rows, n) for b in blocks), "the models' test blocks differ"
    draws = np.random.default_rng(seed).integers(0, len(n), (resamples, len(n)))
    counts = np.stack([np.bincount(d, minlength=len(n)) for d in draws])  # (resamples, blocks)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    idx = [torch.as_tensor(v) for v in sets_.values()]
    # filled in place: no small tensor outlives a chunk's large ones, so the heap reuses their
    # memory whole
    means = torch.empty(resamples, len(idx), len(blocks), dtype=torch.float64)
    for i in range(0, resamples, chunk):
        c = counts[i:i + chunk]  # (chunk, blocks)
        for m, s in enumerate(b.sums for b in blocks):
            S = torch.einsum("rb,bkv->rkv", c, s)  # (chunk, 5, voxels)
            N = (c @ n)[:, None]  # (chunk, 1)
            var = (N * S[:, 2] - S[:, 0] ** 2) * (N * S[:, 3] - S[:, 1] ** 2)
            r = (N * S[:, 4] - S[:, 0] * S[:, 1]) / var.clamp_min(1e-300).sqrt()
            for j, ix in enumerate(idx):
                means[i:i + chunk, j, m] = r[:, ix].mean(1)
    return means


def change_ci(a, b, sets_, resamples=1000, seed=0):
    """The 95% percentile interval of each set's relative change in mean r (percent), b against
    a, by a block bootstrap (bootstrap_means). a, b: BlockSums."""
    m = bootstrap_means([a, b], sets_, resamples, seed)
    changes = 100 * (m[..., 1] - m[..., 0]) / m[..., 0].abs()  # (resamples, sets)
    return {k: np.percentile(changes[:, j].numpy(), [2.5, 97.5]).tolist()
            for j, k in enumerate(sets_)}


def difference_ci(a, b, sets_, resamples=1000, seed=0):
    """The 95% percentile interval of each set's difference in mean r, b minus a, by the same
    block bootstrap (the same resampled blocks for both models). a, b: BlockSums."""
    m = bootstrap_means([a, b], sets_, resamples, seed)
    diff = m[..., 1] - m[..., 0]  # (resamples, sets)
    return {k: np.percentile(diff[:, j].numpy(), [2.5, 97.5]).tolist()
            for j, k in enumerate(sets_)}


def summarize_epochs(res, ceiling, epochs):
    """{"epoch", "epochs"}: results.json's record of the epochs --select names, the last kept:
    summarize() of each, res itself for the last and res.epochs[e] for the others."""
    return dict(epoch=epochs[-1], epochs={str(e): summarize(res.epochs.get(e, res), ceiling)
                                          for e in epochs})


def epoch_rows(record):
    """The table rows of results.json's record of a subject: each set's, or with "epochs" each
    set's at each epoch ("all @6": the model after epoch 6)."""
    if "epochs" not in record:
        return record["test"]
    return {f"{k} @{e}": t[k] for k in record["test"] for e, t in record["epochs"].items()}


def summarize(res, ceiling):
    """{set: {"n_voxels", "baseline_r", ...}}: the mean of each per-voxel r of res (Results) over
    each of its sets; the *_norm keys divide by the noise ceiling (cc_max) where there is one;
    with the refit's block sums, change_ci: the 95% interval of the relative change in mean r,
    percent. The tuned r (its heads') is shown only for a set of trained voxels alone: a mean over
    a part of a row's voxels would sit beside means over all of them."""
    blocks = res.refit_blocks is not None and res.baseline_blocks is not None
    ci = change_ci(res.baseline_blocks, res.refit_blocks, res.sets) if blocks else {}
    out = {}
    for name, idx in res.sets.items():
        row = {"n_voxels": int(len(idx))}
        for key, r in res.r().items():
            v = r[idx]
            shown = np.isfinite(v).all() if key == "tuned_r" else np.isfinite(v).any()
            row[key] = float(np.nanmean(v)) if shown else None
            if ceiling is not None and key != "tuned_r":
                ok = idx[np.isfinite(ceiling[idx])]
                row[key + "_norm"] = float(np.nanmean(r[ok] / ceiling[ok])) if len(ok) else None
        if name in ci:
            row["change_ci"] = ci[name]
        out[name] = row
    return out


def cell(x, width=8):
    """A table cell: x to four digits, or '-' where there is no value."""
    return f"{x:{width}.4f}" if x is not None else f"{'-':>{width}}"


def protocol_line(p=None):
    """The line naming the protocol p (results.json's "protocol") above a results table."""
    p = p or {"name": "windows", "history": "the run's"}
    pooled = "the mean of its frames" if p.get("pool") == "mean" else "in TR bins"  # --pool
    if p["name"] == "windows":
        how = f"{p['history']} TRs of audio before each row, {pooled}"
    elif p.get("frame") == "first":  # --frame first
        how = (f"the first frame of each {p['context'] + p['stride']:g} s snippet every "
               f"{p['stride']:g} s, Lanczos to the TRs, delays {','.join(map(str, p['delays']))}")
    else:
        how = (f"{p['context']:g} s heard before each {p['stride']:g} s stride, Lanczos to the "
               f"TRs, delays {','.join(map(str, p['delays']))}")
    skip = f"; test rows from {p['test_skip']} on" if p.get("test_skip") else ""
    control = f"; control {p['control']}" if p.get("control") else ""
    return f"protocol {p['name']}: {how}{skip}{control}"


def format_table(tests, scored=None):
    """{subject: summarize(...)} -> the results table, under a line naming the protocol `scored`
    (results.json's "protocol"); a subject column when there are several."""
    multi = len(tests) > 1
    norm = any("baseline_r_norm" in r for t in tests.values() for r in t.values())
    lines = [protocol_line(scored),
             (f"{'subject':>8} " if multi else "") + f"{'set':>12} {'voxels':>7} "
             f"{'baseline r':>11} {'tuned r':>8} {'refit r':>8} {'change [95% interval]':>24}"
             + (f" {'base r/cc':>9} {'refit r/cc':>10}" if norm else "")]
    for subject, test in tests.items():
        for name, row in test.items():
            base, refit = row.get("baseline_r"), row.get("refit_r")
            change = "-"
            if refit is not None and base:
                change = f"{100 * (refit - base) / abs(base):+.1f}%"
            if "change_ci" in row:
                change += " [{:+.1f}, {:+.1f}]".format(*row["change_ci"])
            line = (f"{subject:>8} " if multi else "") + f"{name:>12} {row['n_voxels']:7d} "
            line += f"{cell(base, 11)} {cell(row.get('tuned_r'))} {cell(refit)} {change:>24}"
            if norm:
                line += f" {cell(row.get('baseline_r_norm'), 9)}"
                line += f" {cell(row.get('refit_r_norm'), 10)}"
            lines.append(line)
    return "\n".join(lines)


def permutation_p(p, y, block=10, permutations=1000, seed=0, chunk=25):
    """One-sided p-value of each voxel's r > 0 by a block permutation (the Huth lab's test): whole
    blocks of `block` TRs of y shuffled against p (rows after the last whole block left out);
    (1 + #{permuted r >= r}) / (1 + permutations). p, y: (rows, voxels)."""
    nb = len(y) // block

    def unit(x):  # each column centred and of unit norm, so that r is a plain sum of products
        x = x[:nb * block].double()
        x = x - x.mean(0)
        return (x / x.norm(dim=0).clamp_min(1e-300)).reshape(nb, block, -1)
    # (blocks, blocks, voxels): block i of p against block j of y
    C = torch.einsum("itv,jtv->ijv", unit(p), unit(y))
    r = C.diagonal(dim1=0, dim2=1).sum(-1)  # (voxels,)
    rng = np.random.default_rng(seed)
    orders = torch.as_tensor(np.stack([rng.permutation(nb) for _ in range(permutations)]))
    exceed = torch.zeros_like(r)
    for o in orders.split(chunk):  # (chunk, blocks): block i of p against block o[i] of y
        exceed += (C[torch.arange(nb)[None], o].sum(1) >= r - 1e-12).sum(0)
    return (1 + exceed) / (1 + permutations)


def fdr(p, q=0.05):
    """Benjamini-Hochberg: which p-values (NaN: none) are discoveries at false discovery rate q."""
    p = np.where(np.isfinite(p), p, np.inf)
    order, m = np.argsort(p), np.isfinite(p).sum()
    passed = np.flatnonzero(p[order][:m] <= q * np.arange(1, m + 1) / max(m, 1))
    out = np.zeros(len(p), bool)
    out[order[:passed[-1] + 1] if len(passed) else []] = True
    return out

