"""The flags that set the papers' recipes as their authors' code runs them: the epochs scored
(--select), SpecAugment and LayerDrop (--mask-time-*, --layer-drop), the feature projection
tuned (--tune), the heads' raw input (--head-input), the training lag (--lag), the validation
score per story, and a --roi file from a noise-ceiling file (voxels.py nc)."""
import json
import os

import numpy as np
import pytest
import torch

import config
import data
import model
import objective
import preflight
import ridge
import train
import voxels
from model import Augment, load_checkpoint


def fast(demo, out, *extra):
    return ["--data", demo, "--model", "tiny", "--out", str(out), "--batch-size", "8", "--lr",
            "1e-3", "--tiny-pretrain", "0", *extra]


def runs(mask):
    """The lengths of the runs of True in each row of a (rows, frames) bool array."""
    out = []
    for row in mask.astype(int):
        edges = np.diff(np.concatenate([[0], row, [0]]))
        out += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    return np.array(out)


@pytest.mark.parametrize("frames, prob, length, least", [(200, 0.05, 10, 2), (97, 0.3, 5, 0),
                                                         (50, 0.65, 10, 2)])
def test_time_masks_are_drawn_as_transformers_draws_them(frames, prob, length, least):
    """transformers' _compute_mask_indices (what a Hugging Face WavLM applies in train mode) as
    the oracle: over many draws, the same masked share and the same span lengths (overlapping
    spans merge into longer runs), every run at least one span long."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices
    np.random.seed(0)
    torch.manual_seed(0)
    theirs = np.concatenate([_compute_mask_indices((2, frames), prob, length, min_masks=least)
                             for _ in range(2000)])
    ours = np.concatenate([model.time_mask(2, frames, Augment(prob, length, least)).numpy()
                           for _ in range(2000)])
    for a, b in ((theirs.mean(1), ours.mean(1)), (runs(theirs), runs(ours))):
        se = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se
    assert runs(ours).min() == length and ours.sum(1).max() <= theirs.sum(1).max()
    share = [np.bincount(runs(m), minlength=frames + 1) / len(runs(m)) for m in (theirs, ours)]
    assert 0.5 * np.abs(share[0] - share[1]).sum() < 0.05  # the run lengths' distributions


def tiny_backbone():
    torch.manual_seed(0)
    return model.build_backbone("tiny")


def test_augment_acts_in_training_mode_only_and_is_torchaudios_forward_otherwise():
    backbone, wave = tiny_backbone(), torch.randn(3, 16000)
    plain = backbone.extract_features(wave, num_layers=3)[0]
    off = model.augmented_layers(backbone.train(), wave, 3, Augment())
    assert all(torch.equal(a, b) for a, b in zip(plain, off))  # the same forward, by hand
    every = Augment(mask_prob=0.5, layer_drop=0.99)
    assert torch.equal(model.hidden(backbone.eval(), wave, 3, augment=every), plain[-1])
    seen = []
    backbone.encoder.transformer.pos_conv_embed.register_forward_hook(
        lambda m, inputs, out: seen.append(inputs[0]))
    torch.manual_seed(1)
    out = model.hidden(backbone.train(), wave, 3, augment=every)
    zeros = (seen[-1] == 0).all(-1)  # (batch, frames): the masked frames, set to zero
    assert 0.3 < zeros.float().mean() < 0.6 and runs(zeros.numpy()).min() >= 10
    # LayerDrop skips every layer it may: WavLM's first computes the position bias, so it stays
    torch.manual_seed(1)
    drop = model.hidden(backbone, wave, 3, augment=Augment(layer_drop=0.99))
    assert torch.allclose(drop, backbone.extract_features(wave, num_layers=1)[0][-1], atol=1e-6)
    assert not torch.allclose(out, plain[-1])


def test_the_recipes_set_the_authors_flags_and_braintunes_own_stay_as_they_were():
    for recipe in ("demo", "li2024"):
        args = config.parse(["--recipe", recipe, "--data", "somewhere"])
        assert (args.select, args.lag, args.tune, args.head_input, args.mask_time_prob,
                args.layer_drop, args.precision) == ("val", 0, "transformer", "zscored", 0.0, 0.0,
                                                     "auto")
    moussa = config.parse(["--recipe", "moussa2025", "--data", "somewhere"])
    assert config.scored_epochs(moussa) == [6, 11, 21] and moussa.epochs == 21  # epoch_5 ...
    bwl = config.parse(["--recipe", "brainwavlm", "--data", "somewhere"])
    assert bwl.lora_dropout == 0 and bwl.lag == 1 and config.augment(bwl) == Augment(
        0.05, 10, 2, 0.05)
    assert config.parse(["--recipe", "brainwavlm", "--data", "x", "--select", "last"]).select == \
        "last"


def test_a_lag_moves_every_training_window_back_by_whole_trs(demo):
    ds0, shared0 = config.load_subjects(config.parse(["--data", demo]), ["S01"])
    ds1, shared1 = config.load_subjects(config.parse(["--data", demo, "--lag", "1"]), ["S01"])
    for a, b in zip(shared0["train"].ends, shared1["train"].ends):
        assert (np.abs(a[:-1] - b[1:]) <= 1).all()  # row r at lag 1: row r - 1's audio
    assert shared0["train"].timing["lag"] == 0 and shared1["train"].timing["lag"] == 1
    at = int(np.flatnonzero(shared0["train"].ends[0][:-1] == shared1["train"].ends[0][1:])[0])
    assert torch.equal(shared0["train"][at][0], shared1["train"][at + 1][0])
    with pytest.raises(ValueError, match=r"the window of its first fMRI frame, --lag 6 TRs "
                                         r"earlier, ends at -1.0 s, before the audio starts"):
        preflight.list_subjects(config.parse(["--data", demo, "--lag", "6"]), ["S01"])


@pytest.mark.parametrize("bottleneck", [0, 3])
def test_raw_head_input_starts_as_the_same_function_and_its_heads_move_otherwise(bottleneck):
    """--head-input raw: the heads folded so that the model is the same function at the start,
    and the gradient reaching the features (the backbone) the same at the first step; the heads'
    own gradients differ (d/dW' of W' x is g x', not g z'), so they move apart from there."""
    torch.manual_seed(0)
    p, v = 8, 5
    mu, sd = torch.randn(p), torch.rand(p) + 0.5
    W = torch.randn(p, v)
    ex = model.Extractor("tiny", tiny_backbone(), 2)
    nets = [model.BrainModel(ex, [model.make_head(W, bottleneck)], mu, sd, 2, raw=raw)
            for raw in (False, True)]
    xs = [(torch.randn(4, p, generator=torch.Generator().manual_seed(1))).requires_grad_()
          for _ in nets]
    outs = [net.heads[0](net.head_input(x)) for net, x in zip(nets, xs)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for out in outs:
        out.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-4, rtol=1e-4)
    first = [net.heads[0][0] if bottleneck else net.heads[0] for net in nets]
    assert not torch.allclose(first[0].weight.grad, first[1].weight.grad, rtol=0.1)
    if not bottleneck:  # g x' = g (z sd + mu)': the z-scored head's gradient times sd, plus g mu'
        want = first[0].weight.grad * sd + first[0].bias.grad[:, None] * mu
        torch.testing.assert_close(first[1].weight.grad, want, atol=1e-3, rtol=1e-4)
    assert nets[1].head_input(xs[1]) is xs[1]


def test_tune_feature_projection_trains_all_but_the_cnn():
    for projection in (False, True):
        backbone = model.add_adapters(tiny_backbone(), 2, 0, 1.0, 0.0, "qkv",
                                      projection=projection)
        assert all(p.requires_grad == projection
                   for p in backbone.encoder.feature_projection.parameters())
        assert not any(p.requires_grad for p in backbone.feature_extractor.parameters())
        assert all(p.requires_grad for p in backbone.encoder.transformer.layers[0].parameters())


def test_the_validation_score_is_each_voxels_r_averaged_over_the_stories():
    torch.manual_seed(0)
    pred, y = torch.randn(70, 3), torch.randn(70, 3)
    r = objective.story_mean_r(pred, y, [30, 40])
    want = [np.mean([np.corrcoef(pred[a:b, j], y[a:b, j])[0, 1] for a, b in ((0, 30), (30, 70))])
            for j in range(3)]
    np.testing.assert_allclose(r.numpy(), want, atol=1e-5)
    assert not torch.allclose(r, ridge.pearson(pred, y))  # not the rows joined


def test_select_epochs_scores_each_epoch_named_and_keeps_the_last(demo, tmp_path, capsys):
    run = train.main(fast(demo, tmp_path / "r", "--epochs", "2", "--select", "1,2",
                          "--patience", "1"))
    assert sorted(f for f in os.listdir(run) if f.startswith("epoch_")) == ["epoch_1.pt"]
    res = json.load(open(os.path.join(run, "results.json")))
    assert res["epoch"] == 2 and res["epochs"]["2"] == res["test"]
    assert res["epochs"]["1"]["all"]["refit_r"] != res["test"]["all"]["refit_r"]
    assert load_checkpoint(os.path.join(run, "adapter.pt"))["epoch"] == 2
    table = capsys.readouterr().out
    assert "all @1" in table and "all @2" in table
    assert len(open(os.path.join(run, "metrics.jsonl")).readlines()) == 2  # never stopped early
    one = train.main(fast(demo, tmp_path / "one", "--epochs", "1", "--select", "last"))
    kept = load_checkpoint(os.path.join(one, "adapter.pt"))["trainable"]
    saved = load_checkpoint(os.path.join(run, "epoch_1.pt"))["trainable"]
    assert all(torch.equal(kept[k], saved[k]) for k in kept)  # epoch 1 of the longer run
    with pytest.raises(ValueError, match="--select 1,3: must be epochs up to --epochs 2"):
        config.parse(fast(demo, tmp_path / "x", "--epochs", "2", "--select", "1,3"))


def test_voxels_nc_writes_the_voxels_above_the_threshold_and_compares_braintunes(demo, tmp_path,
                                                                                 capsys):
    hf5 = data.response_path(demo, "UTS01", "wheretheressmoke")
    ours = voxels.story_ceiling(hf5, "UTS01")
    theirs = np.nan_to_num(ours, nan=0.0).astype(np.float64)
    theirs[:10] = 0.9  # ten voxels theirs alone (or both)
    np.save(tmp_path / "UTS01.npy", theirs)
    out = str(tmp_path / "roi.npy")
    voxels.main(["nc", str(tmp_path / "UTS01.npy"), "--threshold", "0.4", "--out", out,
                 "--against", hf5])
    roi = np.load(out)
    assert roi.tolist() == np.flatnonzero(theirs > 0.4).tolist() and roi.dtype.kind == "i"
    said = capsys.readouterr().out
    own = np.flatnonzero(np.nan_to_num(ours) > 0.4)
    assert f"braintune's nc0.4 (cc_max of {hf5}'s repeats): {len(own)} voxels" in said
    assert f"{len(np.setdiff1d(roi, own))} in the file's alone" in said
    args = config.parse(["--data", demo, "--roi", out])
    assert voxels.load_roi("", "UTS01", args.roi, len(ours)).tolist() == roi.tolist()
    np.save(tmp_path / "short.npy", theirs[:50])
    np.save(tmp_path / "flat.npy", theirs[None])
    for argv, says in ((["nc", str(tmp_path / "UTS01.npy"), "--out", out], "already exists"),
                       (["nc", str(tmp_path / "short.npy"), "--out", str(tmp_path / "n.npy"),
                         "--against", hf5], "50 voxels, where --against"),
                       (["nc", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "n.npy")],
                        r"expected one noise ceiling per voxel .*shape \(1, 90\)"),
                       (["nc", str(tmp_path / "UTS01.npy"), "--out", str(tmp_path / "n.txt")],
                        "ending in .npy")):
        with pytest.raises(ValueError, match=says):
            voxels.main(argv)
    assert not os.path.exists(tmp_path / "n.npy")


def test_a_run_killed_after_a_listed_epoch_resumes_with_its_epoch_file(demo, tmp_path,
                                                                       killed_after_one_epoch):
    killed_after_one_epoch(fast(demo, tmp_path / "cut", "--epochs", "2", "--select", "1,2"))
    assert os.path.isfile(tmp_path / "cut" / "epoch_1.pt")
    run = train.main(["--resume", str(tmp_path / "cut")])
    res = json.load(open(os.path.join(run, "results.json")))
    assert sorted(res["epochs"]) == ["1", "2"] and res["epoch"] == 2
