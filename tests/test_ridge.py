"""ridge.py: the per-voxel ridge against numpy, Pearson r, the block bootstrap, the block
permutation test and the false discovery rate."""
import numpy as np
import pytest
import torch

import ridge


def ridge_np(X, Y, lam):
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y)


def test_fit_ridge_one_lambda_is_the_closed_form():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((120, 30)), rng.standard_normal((120, 7))
    fit = ridge.fit_ridge(torch.tensor(X), torch.tensor(Y), [3.0], np.repeat(np.arange(4), 30))
    W, best = fit.W, fit.lambdas
    np.testing.assert_allclose(W.numpy(), ridge_np(X, Y, 3.0), rtol=1e-4, atol=1e-8)
    assert best.tolist() == [3.0] * 7


def test_fit_ridge_picks_each_voxels_lambda_by_whole_group_folds():
    rng = np.random.default_rng(1)
    n, p = 160, 100
    X = rng.standard_normal((n, p))
    W_true = rng.standard_normal((p, 6))
    # clean voxels want small lambdas, noisy ones large
    noise = np.array([0.01, 0.01, 10.0, 10.0, 100.0, 100.0])
    Y = X @ W_true + noise * rng.standard_normal((n, 6))
    groups = np.repeat([3, 0, 2, 1], 40)
    alphas = np.logspace(-2, 4, 7)
    fit = ridge.fit_ridge(torch.tensor(X), torch.tensor(Y), alphas, groups)
    W, best = fit.W, fit.lambdas
    # the oracle: numpy, each group held out in turn
    score = np.zeros((len(alphas), 6))
    for g in np.unique(groups):
        tr, te = groups != g, groups == g
        for a, lam in enumerate(alphas):
            pred = X[te] @ ridge_np(X[tr], Y[tr], lam)
            score[a] += [np.corrcoef(pred[:, v], Y[te, v])[0, 1] for v in range(6)]
    want = alphas[score.argmax(0)]
    np.testing.assert_allclose(best.numpy(), want)
    assert want[0] < want[-1]  # the data really asks for different lambdas
    for v in range(6):
        np.testing.assert_allclose(W[:, v].numpy(), ridge_np(X, Y[:, [v]], want[v])[:, 0],
                                   rtol=1e-4, atol=1e-8)


def test_pearson_equals_corrcoef():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((50, 5)), rng.standard_normal((50, 5))
    b[:, 0] += 2 * a[:, 0]
    r = ridge.pearson(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(r, [np.corrcoef(a[:, v], b[:, v])[0, 1] for v in range(5)],
                               rtol=1e-10)
    assert ridge.pearson(torch.ones(10, 1), torch.randn(10, 1)).item() == 0.0


def test_the_ridge_runs_in_full_float32_whatever_training_uses(monkeypatch):
    seen, real = [], torch.linalg.eigh
    matmul = torch.backends.cuda.matmul

    def eigh(a):
        seen.append(matmul.allow_tf32)
        return real(a)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    # allow_tf32 is a property of torch's cuBLAS module, which monkeypatch cannot restore: set and
    # restore it here
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        ridge.fit_ridge(torch.randn(40, 5), torch.randn(40, 3), [1.0], np.repeat(np.arange(2), 20))
        assert seen and not any(seen)  # TF32 off while it runs
        assert matmul.allow_tf32  # and the run's own setting back afterwards
    finally:
        matmul.allow_tf32 = before


def bootstrap_numpy(p, y, block, sets_, a_col, b_col, *, resamples, seed):
    """The oracle: each resample's rows put together block by block, r by numpy, the percentiles."""
    edges = list(range(0, len(y), block)) + [len(y)]
    blocks = [np.arange(s, e) for s, e in zip(edges[:-1], edges[1:])]
    draws = np.random.default_rng(seed).integers(0, len(blocks), (resamples, len(blocks)))
    out = {k: [] for k in sets_}
    for d in draws:
        rows = np.concatenate([blocks[i] for i in d])
        r = {m: np.array([np.corrcoef(p[m][rows, v], y[rows, v])[0, 1]
                          for v in range(y.shape[1])]) for m in (a_col, b_col)}
        for k, idx in sets_.items():
            ma, mb = r[a_col][idx].mean(), r[b_col][idx].mean()
            out[k].append(100 * (mb - ma) / abs(ma))
    return {k: np.percentile(v, [2.5, 97.5]) for k, v in out.items()}


def test_the_bootstrap_interval_equals_numpy_and_sees_a_known_effect():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((53, 6))  # 53 TRs: five blocks of 10 and one of 3
    p = {"a": y + 2.0 * rng.standard_normal(y.shape), "b": y + 0.7 * rng.standard_normal(y.shape)}
    sums = {m: ridge.block_sums(torch.tensor(p[m]), torch.tensor(y), [53], 10) for m in p}
    sets_ = {"all": np.arange(6), "two": np.array([1, 4])}
    got = ridge.change_ci(sums["a"], sums["b"], sets_, resamples=200, seed=3)
    want = bootstrap_numpy(p, y, 10, sets_, "a", "b", resamples=200, seed=3)
    for k in sets_:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9)
    assert got["all"][0] > 0  # b predicts better: the interval excludes zero
    same = ridge.change_ci(sums["a"], sums["a"], sets_, resamples=200)
    assert all(v == [0.0, 0.0] for v in same.values())  # two identical models: [0, 0]


def test_block_permutation_p_is_uniform_for_noise_and_small_for_a_real_effect():
    rng = np.random.default_rng(1)
    y = torch.tensor(rng.standard_normal((200, 600)))
    noise = ridge.permutation_p(torch.tensor(rng.standard_normal((200, 600))), y, block=10,
                                permutations=200)
    assert abs(noise.mean() - 0.5) < 0.05 and abs((noise < 0.1).double().mean() - 0.1) < 0.04
    real = ridge.permutation_p(y[:, :5] + torch.tensor(rng.standard_normal((200, 5))), y[:, :5],
                               10, 200)
    assert (real == 1 / 201).all()
    # Benjamini-Hochberg by hand, m = 4 p-values, thresholds 0.0125, 0.025, 0.0375, 0.05: the
    # largest k
    # with p_(k) <= its threshold and every smaller p pass (step-up), NaN never does
    assert ridge.fdr(np.array([0.001, 0.01, 0.04, 0.5, np.nan])).tolist() == [True, True, False,
                                                                              False, False]
    assert ridge.fdr(np.array([0.03, 0.034, 0.04, 0.045])).tolist() == [True] * 4


def test_a_rows_tuned_r_covers_its_voxels_or_is_not_shown():
    blocks = ridge.BlockSums(torch.zeros(1, 5, 4, dtype=torch.float64), torch.ones(1))
    tuned = np.array([0.5, 0.7, np.nan, np.nan])  # tuned on voxels 0 and 1 only
    res = ridge.Results({"all": np.arange(4), "trained": np.arange(2)}, np.arange(2),
                        np.full(4, 0.1), blocks, tuned_r=tuned, refit_r=np.full(4, 0.2))
    out = ridge.summarize(res, None)
    assert out["all"]["tuned_r"] is None and out["trained"]["tuned_r"] == pytest.approx(0.6)
    assert out["all"]["baseline_r"] == pytest.approx(0.1)
    assert out["all"]["refit_r"] == pytest.approx(0.2)


def test_the_paired_difference_is_zero_against_itself_and_sees_a_known_effect():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((60, 8))
    p = {"a": y + 2.0 * rng.standard_normal(y.shape), "b": y + 0.5 * rng.standard_normal(y.shape)}
    sums = {m: ridge.block_sums(torch.tensor(p[m]), torch.tensor(y), [60], 10) for m in p}
    sets_ = {"all": np.arange(8)}
    assert ridge.difference_ci(sums["a"], sums["a"], sets_, resamples=200)["all"] == [0.0, 0.0]
    lo, hi = ridge.difference_ci(sums["a"], sums["b"], sets_, resamples=200)["all"]
    r = [np.mean([np.corrcoef(p[m][:, v], y[:, v])[0, 1] for v in range(8)]) for m in "ab"]
    assert 0 < lo <= r[1] - r[0] <= hi  # b predicts better, and the interval holds the difference
