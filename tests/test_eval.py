import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

import cache
import compare
import eval as ev
import plots
import probes
import train
from model import load_backbone


def test_show_repeats_the_results_with_normalised_r(run):
    table = ev.show(run)
    res = json.load(open(os.path.join(run, "results.json")))
    assert "r/cc" in table and f"{res['test']['AC']['refit_r']:.4f}" in table
    assert res["test"]["AC"]["refit_r_norm"] > res["test"]["AC"]["refit_r"]  # cc_max < 1


def test_export_loads_strictly_and_reproduces_the_tuned_features(run, tmp_path):
    path = ev.export(run, str(tmp_path / "tuned.pt"))
    r = ev.load_run(run)
    layer = r.tuned.layer
    fresh = load_backbone("tiny", seed=123)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 40000)
    with torch.no_grad():
        want = r.tuned.backbone.extract_features(x, num_layers=layer)[0][-1]
        got = fresh.extract_features(x, num_layers=layer)[0][-1]
        base = r.pretrained.backbone.extract_features(x, num_layers=layer)[0][-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - base).abs().max() > 1e-4  # the tuning really changed the backbone
    with pytest.raises(ValueError, match="already exists"):
        ev.export(run, path)


def test_plots_are_pngs_with_labelled_axes(run, monkeypatch):
    import matplotlib.figure
    labels = []
    real = matplotlib.figure.Figure.savefig

    def record(fig, *a, **k):
        labels.extend((ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes)
        return real(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    paths = plots.plot(ev.load_run(run))
    names = {"scatter.png", "curves.png", "weight_change.png", "change_hist.png"}
    assert {os.path.basename(p) for p in paths} == names
    for p in paths:
        head = open(p, "rb").read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", head[16:24])
        assert 300 <= w <= 2000 and 250 <= h <= 2000
    assert labels and all(x and y for x, y in labels)


def test_one_command_loads_the_run_once_for_all_its_analyses(run, tmp_path, monkeypatch, capsys):
    calls, real = [], ev.load_run

    def counted(folder, device=None):
        calls.append(folder)
        return real(folder, device)
    monkeypatch.setattr(ev, "load_run", counted)
    seed = shutil.copytree(run, tmp_path / "seed")  # a second run (the run itself is refused)
    ev.main([run, "--plot", "--seeds", str(seed), "--export", str(tmp_path / "t.pt")])
    assert calls == [run] and "wrote" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "t.pt")


def test_stability_equals_numpy(tmp_path):
    runs = []
    rng = np.random.default_rng(0)
    for i in range(3):
        d = tmp_path / f"r{i}"
        d.mkdir()
        test = {s: {"n_voxels": 5, "baseline_r": float(rng.random()),
                    "refit_r": float(rng.random())}
                for s in ("all", "AC")}
        json.dump({"test": test}, open(d / "results.json", "w"))
        runs.append(str(d))
    out, table = compare.stability(runs[:2], vs=runs[2:])
    rows = [json.load(open(os.path.join(r, "results.json")))["test"]["AC"] for r in runs[:2]]
    change = [r["refit_r"] - r["baseline_r"] for r in rows]
    assert out["A"]["AC"]["mean"] == pytest.approx(np.mean(change))
    assert out["A"]["AC"]["std"] == pytest.approx(np.std(change))
    assert out["B"]["all"]["runs"] == 1 and out["B"]["all"]["std"] == 0


def test_evals_rebuilt_tuned_model_reproduces_the_runs_refit(run):
    r = ev.load_run(run)
    d = r.subject(r.subjects[0])
    with cache.no_cache():  # features extracted again from the rebuilt backbone, not read back
        refit = r.fit(r.tuned, d).test_r.numpy()
    saved = np.load(os.path.join(run, "voxel_r.npz"))["refit_r"]
    np.testing.assert_allclose(refit, saved, rtol=1e-4, atol=1e-5)


def test_bad_run_folders_are_clear_errors(run, tmp_path):
    with pytest.raises(ValueError, match="no such run folder"):
        ev.load_run(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    os.remove(broken / "stage1.pt")
    with pytest.raises(ValueError, match="incomplete: stage1.pt is missing"):
        ev.load_run(str(broken))
    other = tmp_path / "other"
    shutil.copytree(run, other)
    state = torch.load(other / "adapter.pt", weights_only=True)
    key = "extractor.backbone.encoder.transformer.layers.9.attention.q_proj.lora_A"
    state["trainable"][key] = torch.zeros(1)
    torch.save(state, other / "adapter.pt")
    with pytest.raises(ValueError, match="does not fit the tiny model"):
        ev.load_run(str(other))


def test_multi_subject_run_transfers_to_a_left_out_subject(demo, tmp_path):
    run = train.main(["--data", demo, "--model", "tiny", "--out", str(tmp_path / "m"),
                      "--batch-size", "8", "--epochs", "1", "--lr", "1e-2", "--subject", "S01,S02"])
    lines = ev.show(run).splitlines()
    assert lines[0].startswith("protocol windows") and lines[1].split()[0] == "subject"
    assert sum(line.split()[0] == "UTS02" for line in lines) == 4
    ev.cross_subject(run, "S03")  # S03 was not tuned on
    t = json.load(open(os.path.join(run, "analyses.json")))["transfer_UTS03"]
    assert t["AC"]["baseline_r"] > 0.2 and t["AC"]["refit_r"] > 0.2 and t["AC"]["n_voxels"] > 0
    names = {os.path.basename(p) for p in plots.plot(ev.load_run(run))}
    want = {"scatter_UTS01.png", "scatter_UTS02.png", "change_hist_UTS02.png", "curves.png"}
    assert want <= names
    out, _ = compare.stability([run, run])
    assert out["A"]["UTS02 AC"]["std"] == 0 and out["A"]["UTS01 all"]["runs"] == 2


def test_a_moved_run_folder_still_loads_tinys_pretrained_weights(run, tmp_path):
    moved = shutil.copytree(run, tmp_path / "moved")
    cfg = json.load(open(moved / "config.json"))
    assert cfg["args"]["weights"] == os.path.join(run, "tiny_pretrained.pt")
    cfg["args"]["weights"] = "/gone/tiny_pretrained.pt"  # where the run was made
    (moved / "config.json").write_text(json.dumps(cfg))
    pre = ev.load_run(str(moved)).pretrained.backbone
    want = torch.load(moved / "tiny_pretrained.pt", weights_only=True)
    assert all(torch.equal(v, want[k]) for k, v in pre.state_dict().items())


def test_the_layer_profile_forwards_once_and_its_run_layer_is_the_baseline(run, monkeypatch):
    forwarded = []

    def count(module, inputs):
        forwarded.append(len(inputs[0]))
    loaded = ev.load_run(run)
    for ex in (loaded.pretrained, loaded.tuned):
        ex.backbone.feature_extractor.register_forward_pre_hook(count)
    with cache.no_cache():  # every layer extracted here, none read from the run's cache
        out, table = probes.profile(loaded, [1, 2, 3, 4])
    layer = loaded.pretrained.layer
    d = loaded.subject(loaded.subjects[0])
    # one forward per window and backbone
    assert sum(forwarded) == 2 * (len(d.windows["train"]) + len(d.windows["test"]))
    assert set(out) == {"1", "2", "3", "4"} and "tuned" not in out["4"]
    assert "tuned" in out[str(layer)]
    baseline = json.load(open(os.path.join(run, "results.json")))["test"]
    for k, r in out[str(layer)]["pretrained"].items():  # the run's own layer: its stage-1 baseline
        assert r == pytest.approx(baseline[k]["baseline_r"], abs=1e-6), k
    assert json.load(open(os.path.join(run, "analyses.json")))["layers"] == out
    assert "layers.png" in {os.path.basename(p) for p in plots.plot(loaded)}


def test_significance_counts_voxels_and_keeps_their_p_values(run):
    # this test story has 24 TRs: blocks of 2
    out, table = compare.significance(ev.load_run(run), permutations=999, block=2)
    npz = np.load(os.path.join(run, "voxel_r.npz"))
    truth = os.path.join(ev.load_run(run).args.data, "derivative", "ground_truth", "UTS01.npz")
    kind = np.load(truth)["kind"]
    assert npz["baseline_p"].shape == npz["refit_p"].shape == (90,)
    assert np.isfinite(npz["refit_p"]).all()
    # measured on this 24-TR test story: median p 0.015 for AC voxels, 0.36 for those that follow
    # nothing; 7 AC voxels pass the false discovery rate, no semantic one
    assert np.median(npz["baseline_p"][kind == 0]) < 0.05 < np.median(npz["baseline_p"][kind == 2])
    assert 0 < out["baseline"]["AC"] <= out["baseline"]["all"] and out["baseline"]["all"] < 30
    assert "significance" in json.load(open(os.path.join(run, "analyses.json")))


def test_a_run_against_itself_differs_by_nothing_and_another_subject_is_refused(run, demo,
                                                                                tmp_path):
    r = ev.load_run(run)
    out, table = compare.against(r, r)
    assert all(row["difference"] == 0 and row["difference_ci"] == [0.0, 0.0]
               for row in out["sets"].values())
    saved = json.load(open(os.path.join(run, "results.json")))["test"]
    assert out["sets"]["AC"]["a_refit_r"] == pytest.approx(saved["AC"]["refit_r"], abs=1e-4)
    other = train.main(["--data", demo, "--model", "tiny", "--subject", "S02", "--epochs", "1",
                        "--batch-size", "8", "--out", str(tmp_path / "s02")])
    with pytest.raises(ValueError, match="cannot be paired with .*: the subjects differ"):
        compare.against(r, ev.load_run(other))


def test_the_efficiency_curve_ends_at_the_runs_own_refit(run):
    out, table = compare.efficiency(ev.load_run(run))
    saved = json.load(open(os.path.join(run, "results.json")))["test"]
    last = out["curve"][-1]
    assert last["stories"] == 4 and [p["stories"] for p in out["curve"]] == sorted(
        p["stories"] for p in out["curve"])
    for k, row in saved.items():
        assert last["tuned"][k] == pytest.approx(row["refit_r"], abs=1e-4), k
        assert last["pretrained"][k] == pytest.approx(row["baseline_r"], abs=1e-4), k
    assert set(out["reach"]) == set(saved) and "hours" in table


def cache_entries():
    """{kind: entries} of the features, protocol features and ridge fits in the test cache."""
    root = os.environ["BRAINTUNE_CACHE"]
    return {k: sorted(os.listdir(os.path.join(root, k))) if os.path.isdir(os.path.join(root, k))
            else [] for k in ("features", "protocol", "stage1")}


def test_eval_reads_the_runs_own_features_and_fits_and_says_when_it_cannot(run, tmp_path, capsys,
                                                                            monkeypatch):
    loaded = ev.load_run(run)
    loaded.fit(loaded.pretrained, loaded.subject("S01"))  # as train.py fit them: all cached
    loaded.fit(loaded.tuned, loaded.subject("S01"))
    before = cache_entries()
    compare.significance(loaded, permutations=99)
    assert cache_entries() == before and "note:" not in capsys.readouterr().out
    gpu = shutil.copytree(run, tmp_path / "gpu")  # the same run, as if trained on a GPU in bf16
    cfg = json.load(open(gpu / "config.json"))
    cfg["ran_on"] = {"device": "cuda:0", "precision": "bf16"}
    (gpu / "config.json").write_text(json.dumps(cfg))
    assert ev.load_run(str(gpu)).device == torch.device("cpu")  # this machine has no GPU
    note = capsys.readouterr().out
    assert "was trained on cuda:0 in bf16; on this CPU in fp32, the features of its" in note
    assert "extracted again, about" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one that has: its GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ran = ev.run_device(str(gpu), loaded.args, [], None)
    assert ran == torch.device("cuda", 0) and capsys.readouterr().out == ""
    assert ev.run_device(str(gpu), loaded.args, [], "cpu") == torch.device("cpu")  # --device


@pytest.mark.cuda
def test_eval_on_a_cuda_run_reads_the_features_and_fits_it_cached(demo, tmp_path):
    """The CPU's logic: test_eval_reads_the_runs_own_features_and_fits_and_says_when_it_cannot."""
    run = train.main(["--data", demo, "--model", "tiny", "--out", str(tmp_path / "r"),
                      "--batch-size", "8", "--epochs", "1", "--device", "cuda"])
    before = cache_entries()
    loaded = ev.load_run(run)
    assert loaded.device.type == "cuda"
    compare.significance(loaded, permutations=99)
    assert cache_entries() == before
