import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from scipy.io import wavfile

import data
import textgrid
import voxels
from model import pool_frames


def test_row_times_worked_example():
    # row 0 is scanner TR 10, centred at 10 * 2.0045 - 10 + 2.0045 / 2 = 11.04725 s after audio
    # onset
    np.testing.assert_allclose(data.row_times(3), [11.04725, 13.05175, 15.05625])
    np.testing.assert_allclose(data.row_times(1, tr=2.0, trim_start=5, sound_start=4.0), [7.0])


def write_story(root, name, seconds, n_rows, n_vox=4, sr=data.SR, *, click=None,
                subj="UTS01"):
    os.makedirs(os.path.join(root, "stimuli"), exist_ok=True)
    d = os.path.join(root, "derivative", "preprocessed_data", subj)
    os.makedirs(d, exist_ok=True)
    audio = np.zeros(int(seconds * sr), np.float32)
    if click is not None:
        audio[int(round(click * sr))] = 1.0
    wavfile.write(os.path.join(root, "stimuli", name + ".wav"), sr, audio)
    with h5py.File(os.path.join(d, name + ".hf5"), "w") as f:
        f["data"] = np.random.default_rng(0).standard_normal((n_rows, n_vox)).astype(np.float32)


def test_click_lands_in_the_predicted_bin(tmp_path):
    H, click = 6, 20.3
    write_story(tmp_path, "story", 40.0, 12, click=click)
    waves = data.load_audio(tmp_path, ["story"])
    resp, _ = data.load_responses(tmp_path, "UTS01", ["story"])
    win = data.Windows(waves, resp, ["story"], history=H)
    t = data.row_times(12)
    hits = 0
    for i in range(len(win)):
        wave, s, r = win[i]
        assert wave.shape == (win.n_samples,)
        bins = pool_frames(wave.abs()[None, :, None], H)[0, :, 0]  # (H,) bin k = delay k
        if t[r] - H * data.TR <= click < t[r]:
            k = int((t[r] - click) // data.TR)
            assert bins[k] > 0 and (bins > 0).sum() == 1, (r, k, bins)
            hits += 1
        else:
            assert bins.sum() == 0
    assert hits == H


def test_stereo_44k_int16_becomes_16k_mono(tmp_path):
    sr, n = 44100, 44100 * 3
    t = np.arange(n) / sr
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), -np.sin(2 * np.pi * 440 * t) * 0.5], 1)
    wavfile.write(tmp_path / "a.wav", sr, (stereo * 20000).astype(np.int16))
    x = data.read_wav(str(tmp_path / "a.wav"))
    assert x.dtype == torch.float32 and x.shape == (3 * data.SR,)
    # the mix-down of +1 and -0.5 is a 440 Hz tone at amplitude 0.25 * 20000 / 32768
    assert abs(x[1000:-1000].abs().max().item() - 0.25 * 20000 / 32768) < 0.01


def test_synthetic_dataset_reads_back_with_its_ground_truth(demo):
    subj = data.find_subject(demo, "S01")
    assert subj == "UTS01"
    stories = data.splits(demo, subj)
    train, val, test = (stories[k] for k in ("train", "val", "test"))
    assert test == [data.TEST_STORY] and len(val) == 1 and len(train) == 4
    resp, good = data.load_responses(demo, subj, train + val + test)
    assert good.all()
    truth = np.load(os.path.join(demo, "derivative", "ground_truth", "UTS01.npz"))
    kind, snr = truth["kind"], truth["snr"]
    clean = lambda s: np.where(kind < 2, data.zscore(truth[f"features_{s}"] @ truth["weights"]),
                               0.0)
    X = truth[f"features_{train[0]}"]
    W, *_ = np.linalg.lstsq(X, clean(train[0]), rcond=None)
    r = [np.corrcoef(X @ W[:, v], clean(train[0])[:, v])[0, 1] for v in np.flatnonzero(kind < 2)]
    assert min(r) > 0.99
    # the noisy responses correlate with the clean ones as the known SNR implies
    sig = kind < 2
    measured = np.array([np.corrcoef(resp[s][:, sig].ravel(), clean(s)[:, sig].ravel())[0, 1]
                         for s in train]).mean()
    implied = np.mean(np.sqrt(snr[sig] / (1 + snr[sig])))
    assert abs(measured - implied) < 0.05
    rois = voxels.roi_sets(data.roi_path(demo, subj), len(good))
    assert set(rois) == {"AC", "semantic"} and np.array_equal(rois["AC"], np.flatnonzero(kind == 0))


def test_noise_ceiling_hand_worked():
    # two repeats of one voxel over 3 TRs: [1, 2, 3] and [1, 2, 5]; var is numpy's (ddof=0), as in
    # data.py
    reps = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 5.0]])[:, :, None]
    var_sum = np.var([2.0, 4.0, 8.0])
    sum_var = np.var([1, 2, 3]) + np.var([1, 2, 5])
    SP = (var_sum - sum_var) / 2
    TP = sum_var / 2
    want = 1 / np.sqrt(1 + 0.5 * (TP / SP - 1))
    np.testing.assert_allclose(voxels.noise_ceiling(reps), [want])
    # SP <= 0
    assert np.isnan(voxels.noise_ceiling(np.array([[1.0, 2.0], [2.0, 1.0]])[:, :, None]))[0]


def test_synthetic_noise_ceiling_matches_known_noise(demo):
    truth = np.load(os.path.join(demo, "derivative", "ground_truth", "UTS01.npz"))
    reps = data.read_hf5(os.path.join(demo, "derivative", "preprocessed_data", "UTS01",
                                      data.TEST_STORY + ".hf5"),
                         "individual_repeats")
    N, sig = len(reps), truth["kind"] < 2
    implied = 1 / np.sqrt(1 + truth["noise_sd"][sig] ** 2 / N)
    cc = voxels.noise_ceiling(reps)[sig]
    ok = np.isfinite(cc)
    assert ok.mean() > 0.9
    # measured on this 90-voxel, 24-TR test story: median |error| 0.009
    assert np.median(np.abs(cc[ok] - implied[ok])) < 0.03


def test_bad_inputs_are_clear_errors(tmp_path, demo):
    with pytest.raises(ValueError, match=r"unknown subject 'S09'.*UTS01, UTS02"):
        data.find_subject(demo, "S09")
    root = tmp_path / "ds"
    shutil.copytree(demo, root)
    os.remove(root / "stimuli" / "souls.wav")
    with pytest.raises(ValueError, match="souls.*no audio"):
        data.splits(str(root), "UTS01")
    with pytest.raises(ValueError, match="no responses"):
        data.splits(demo, "UTS01", val_stories=["nosuchstory"])
    bad = root / "derivative" / "preprocessed_data" / "UTS01" / "avatar.hf5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="avatar.hf5: cannot read as HDF5"):
        data.load_responses(str(root), "UTS01", ["avatar"])
    with pytest.raises(ValueError, match="unknown ROI 'V1'.*AC, semantic"):
        voxels.load_roi(data.roi_path(demo, "UTS01"), "UTS01", voxels.parse_roi("V1"), 90)
    np.save(tmp_path / "roi.npy", np.array([3, 200]))
    with pytest.raises(ValueError, match="outside 0..89"):
        voxels.load_roi("", "UTS01", voxels.parse_roi(str(tmp_path / "roi.npy")), 90)
    np.save(tmp_path / "empty.npy", np.zeros(90, bool))
    with pytest.raises(ValueError, match="non-empty"):
        voxels.load_roi("", "UTS01", voxels.parse_roi(str(tmp_path / "empty.npy")), 90)


def test_short_audio_is_an_error_and_a_small_shortfall_is_silence(tmp_path):
    n_rows = 12  # the last frame needs audio up to row_times(12)[-1] = 33.1 s
    write_story(tmp_path / "a", "story", 32.5, n_rows)
    waves = data.load_audio(tmp_path / "a", ["story"])
    resp, _ = data.load_responses(tmp_path / "a", "UTS01", ["story"])
    assert data.Windows(waves, resp,
                        ["story"])[n_rows - 1][0].shape[0] == round(6 * data.TR * data.SR)
    write_story(tmp_path / "b", "story", 25.0, n_rows)
    waves = data.load_audio(tmp_path / "b", ["story"])
    with pytest.raises(ValueError, match=r"story 'story': audio is 25.0 s long .* 33.1 s"):
        data.Windows(waves, resp, ["story"])


def test_nan_is_refused_naming_its_rows_unless_its_voxels_are_dropped(tmp_path):
    write_story(tmp_path, "a", 40.0, 12, n_vox=5)
    write_story(tmp_path, "b", 40.0, 12, n_vox=5)
    p = tmp_path / "derivative" / "preprocessed_data" / "UTS01"
    with h5py.File(p / "a.hf5", "r+") as f:
        x = f["data"][:]
        x[3, 1], x[7, 2], x[:, 4] = np.nan, np.inf, 2.0
        f["data"][:] = x
    with pytest.raises(ValueError, match=f"^{p / 'a.hf5'}: NaN or inf in 2 of its 12 rows \\(row "
                                         "3, 7\\); --drop-nonfinite-voxels leaves out"):
        data.load_responses(tmp_path, "UTS01", ["a", "b"])
    with pytest.warns(UserWarning, match="3 of 5 voxels"):  # NaN, inf, constant: left out
        resp, good = data.load_responses(tmp_path, "UTS01", ["a", "b"], drop_nonfinite=True)
    assert good.tolist() == [True, False, False, True, False]
    assert all(np.isfinite(r).all() for r in resp.values())
    with pytest.raises(ValueError, match="NaN or inf in 2 of its 12 rows"):  # the cached entry too
        data.load_responses(tmp_path, "UTS01", ["a", "b"])
    with h5py.File(p / "b.hf5", "r+") as f:
        f["data"][5] = np.nan  # a whole row: every voxel
    with pytest.raises(ValueError, match="every voxel is NaN, infinite or constant in some story"):
        data.load_responses(tmp_path, "UTS01", ["a", "b"], drop_nonfinite=True)


def test_each_file_is_refused_in_one_sentence_naming_it(tmp_path):
    write_story(tmp_path, "a", 40.0, 12, n_vox=5)
    wav = tmp_path / "stimuli" / "a.wav"
    audio = np.zeros(16000, np.float32)
    audio[8000] = np.nan
    wavfile.write(wav, 16000, audio)
    with pytest.raises(ValueError, match=f"^{wav}: 1 samples are NaN or infinite, the first at "
                                         "0.50 s$"):
        data.read_wav(str(wav))
    header = bytearray(wav.read_bytes())
    header[24:28] = (0).to_bytes(4, "little")  # the sample rate
    wav.write_bytes(bytes(header))
    with pytest.raises(ValueError, match=f"^{wav}: its header says 0 Hz$"):
        data.open_wav(str(wav))
    path = tmp_path / "derivative" / "preprocessed_data" / "UTS01" / "a.hf5"
    with h5py.File(path, "r+") as f:
        f["individual_repeats"] = np.zeros((3, 12, 4), np.float32)  # 4 voxels, not 5
    with pytest.raises(ValueError, match="'individual_repeats' has shape \\(3, 12, 4\\); "
                                         "expected \\(repeats >= 2, TRs, voxels\\) with the 5"):
        voxels.story_ceiling(str(path), "UTS01")
    grid = tmp_path / "a.TextGrid"
    grid.write_text(SHORT.replace("1\n2\n\"AH\"", "2\n1\n\"AH\""))
    with pytest.raises(ValueError, match="tier 'phone', interval 2 ends at 1 s, before it starts "
                                         "\\(2 s\\)"):
        textgrid.read_textgrid(str(grid))
    grid.write_text(SHORT.replace("1\n2\n\"AH\"", "0.5\n2\n\"AH\"").replace(
        "2\n2.5\n\"sp\"\n\"IntervalTier\"", "0.2\n2.5\n\"sp\"\n\"IntervalTier\""))
    with pytest.raises(ValueError, match="interval 3 starts at 0.2 s, before interval 2 \\(0.5 "
                                         "s\\): out of order"):
        textgrid.read_textgrid(str(grid))


def test_a_0_1_roi_of_the_voxel_count_is_a_mask_and_one_of_another_length_is_refused(tmp_path):
    mask = np.zeros(90, np.int64)
    mask[[4, 50, 51]] = 1
    np.save(tmp_path / "mask.npy", mask)
    roi = voxels.parse_roi(str(tmp_path / "mask.npy"))
    assert voxels.load_roi("", "UTS01", roi, 90).tolist() == [4, 50, 51]  # never voxels 0 and 1
    np.save(tmp_path / "short.npy", mask[:89])
    with pytest.raises(ValueError, match="holds 89 0s and 1s, a mask of the wrong length \\(the "
                                         "responses have 90 voxels\\)"):
        voxels.load_roi("", "UTS01", voxels.parse_roi(str(tmp_path / "short.npy")), 90)
    np.save(tmp_path / "two.npy", np.array([0, 1]))  # voxels 0 and 1, each once: indices
    assert voxels.load_roi("", "UTS01", voxels.parse_roi(str(tmp_path / "two.npy")),
                           90).tolist() == [0, 1]


SHORT = '''File type = "ooTextFile"
Object class = "TextGrid"

0
2.5
<exists>
2
"IntervalTier"
"phone"
0
2.5
3
0
1
"HH"
1
2
"AH"
2
2.5
"sp"
"IntervalTier"
"word"
0
2.5
2
0
2
"hello ""you"""
2
2.5
"sp"
'''


def long_format(short):
    v = short.splitlines()
    out = [v[0], v[1], "", f"xmin = {v[3]}", f"xmax = {v[4]}", "tiers? <exists> ",
           f"size = {v[6]}", "item []:"]
    pos = 7
    for t in range(int(v[6])):
        n = int(v[pos + 4])
        out += [f"    item [{t + 1}]:", f"        class = {v[pos]}", f"        name = {v[pos + 1]}",
                f"        xmin = {v[pos + 2]}", f"        xmax = {v[pos + 3]}",
                f"        intervals: size = {n}"]
        for i in range(n):
            a, b, lab = v[pos + 5 + 3 * i: pos + 8 + 3 * i]
            out += [f"        intervals [{i + 1}]:", f"            xmin = {a}",
                    f"            xmax = {b}",
                    f"            text = {lab}"]
        pos += 5 + 3 * n
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("fmt", ["short", "long"])
def test_textgrid_reader_reads_both_formats(tmp_path, fmt):
    path = tmp_path / "a.TextGrid"
    path.write_text(SHORT if fmt == "short" else long_format(SHORT))
    tiers = textgrid.read_textgrid(str(path))
    assert list(tiers) == ["phone", "word"]
    assert tiers["phone"] == [(0, 1, "HH"), (1, 2, "AH"), (2, 2.5, "sp")]
    assert tiers["word"][0] == (0, 2, 'hello "you"')
    phones, words = textgrid.read_phones(str(path)), textgrid.read_words(str(path))
    assert [p[2] for p in phones] == ["HH", "AH"] and len(words) == 1
    (tmp_path / "bad.TextGrid").write_text("hello")
    with pytest.raises(ValueError, match="bad.TextGrid: not a TextGrid"):
        textgrid.read_textgrid(str(tmp_path / "bad.TextGrid"))


def test_synthetic_textgrids_match_the_audio(demo):
    path = os.path.join(demo, "derivative", "TextGrids", "souls.TextGrid")
    raw = [lab for tier in textgrid.read_textgrid(path).values() for _, _, lab in tier]
    # as ds003020's
    assert "{BR}" in raw
    assert any(lab[-1:] in "01" and lab[:-1] in textgrid.PHONEMES for lab in raw)
    phones, words = textgrid.read_phones(path), textgrid.read_words(path)
    assert {p for _, _, p in phones} <= textgrid.PHONEMES
    assert not any("{" in w or w == "sp" for _, _, w in words)
    vocab = {line.split()[0] for line in open(os.path.join(demo, "derivative", "embeddings.txt"))}
    assert words and all(w[2] in vocab for w in words)
    audio = data.read_wav(os.path.join(demo, "stimuli", "souls.wav")).numpy()
    energy = lambda a, b: np.mean(audio[int(a * data.SR):int(b * data.SR)] ** 2)
    gaps = [(w[1], n[0]) for w, n in zip(words, words[1:]) if n[0] - w[1] > 0.1]
    assert np.mean([energy(a + 0.02, b - 0.02) for a,
                    b in gaps]) < 1e-3 * np.mean([energy(*w[:2]) for w in words])


def test_prepare_shares_windows_between_subjects(demo, tmp_path):
    import shutil
    root = shutil.copytree(demo, tmp_path / "ds")
    # a story S02 did not hear
    os.remove(root / "derivative" / "preprocessed_data" / "UTS02" / "avatar.hf5")
    (a, b), shared = data.prepare(str(root), ["S01", "S02"])
    assert "avatar" in shared["train"].stories and "avatar" not in b.stories["train"]
    assert len(shared["train"]) == len(a.windows["train"]) > len(b.windows["train"])
    assert b.stories["val"] == a.stories["val"] and b.stories["test"] == a.stories["test"]
    for d in (a, b):
        # each subject row's audio is its shared window's audio
        for i in range(0, len(d.windows["train"]), 17):
            wave, s, r = d.windows["train"][i]
            assert torch.equal(wave, shared["train"][int(d.window_of["train"][i])][0])
            # and back: the shared window's row of this subject
            assert d.row_of["train"][d.window_of["train"][i]] == i
        heard = d.row_of["train"] >= 0
        assert heard.sum() == len(d.windows["train"])
        assert set(d.window_of["train"].tolist()) == set(torch.nonzero(heard)[:, 0].tolist())
    with pytest.raises(ValueError, match="UTS01 is given twice"):
        data.prepare(str(root), ["S01", "UTS01"])


