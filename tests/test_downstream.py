import csv
import json
import os

import numpy as np
import pytest
import torch
from scipy.io import wavfile
from torchaudio.models import wav2vec2_model

import downstream as ds
import model
import synthetic
import tasks

TONE_HZ = (200, 1000, 4000)  # class k is a tone near this frequency


def tone(k, rng, seconds=0.5):
    """(samples,) at 16 kHz: class k's tone (+-10%), of random length and level, over a noise floor.
    A frozen random tiny tells these apart; synthetic._vowel's vowels it does not (its random CNN
    loses the formants), so the probes' tests use tones."""
    t = np.arange(int(rng.uniform(0.85, 1.0) * seconds * 16000)) / 16000
    x = rng.uniform(0.3, 0.9) * np.sin(2 * np.pi * TONE_HZ[k] * rng.uniform(0.9, 1.1) * t)
    return x + 0.003 * rng.standard_normal(len(t))


def write_wav(path, x):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    wavfile.write(path, 16000, np.round(np.clip(x, -1, 1) * 32767).astype(np.int16))


def write_sphere(path, x, byte_format="01", rate=16000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2" if byte_format == "01" else ">i2")
    head = (f"NIST_1A\n   1024\nsample_count -i {len(pcm)}\nsample_rate -i {rate}\n"
            f"channel_count -i 1\nsample_byte_format -s2 {byte_format}\nsample_n_bytes -i 2\n"
            "sample_coding -s3 pcm\nend_head\n")
    with open(path, "wb") as f:
        f.write(head.encode().ljust(1024, b" ") + pcm.tobytes())


def speechcommands_folder(root, rng, speakers=(12, 3, 6)):
    lists = {"validation_list.txt": [], "testing_list.txt": []}
    for k, word in enumerate(["aa", "iy", "uw"]):
        for j in range(sum(speakers)):
            rel = f"{word}/spk{j:02d}_nohash_0.wav"
            write_wav(os.path.join(root, rel), tone(k, rng))
            if j >= speakers[0]:
                name = "validation_list.txt" if j < sum(speakers[:2]) else "testing_list.txt"
                lists[name].append(rel)
    noise = 0.1 * rng.standard_normal(16000)
    write_wav(os.path.join(root, "_background_noise_", "noise.wav"), noise)
    for name, rel in lists.items():
        open(os.path.join(root, name), "w").write("\n".join(rel) + "\n")
    return str(root)


def timit_folder(root, rng, n_train=10, n_test=2):
    """SA sounds as class 0 (its phone aa, or ao: folded to aa), SX as 1 (iy, ix), SI as 2 (uw, ux);
    LDC's SPHERE for even speakers, RIFF copies (SA1.WAV.wav) for odd ones, a lower-case test
    speaker."""
    for j in range(n_train + n_test):
        part, spk = ("TRAIN", f"DR1/M{j:03d}0") if j < n_train else ("TEST", f"DR2/f{j:03d}0")
        folder = os.path.join(root, part, spk)
        for utt, k, phone in (("SA1", 0, "aa"), ("SA2", 0, "ao"), ("SX10", 1, "iy"),
                              ("SX11", 1, "ix"), ("SI20", 2, "uw"), ("SI21", 2, "ux")):
            x = tone(k, rng)
            name = utt.lower() if part == "TEST" else utt
            if j % 2 == 0 and part == "TRAIN":
                write_sphere(os.path.join(folder, name + ".WAV"), x)
            else:
                riff = name + (".wav" if part == "TEST" else ".WAV.wav")
                write_wav(os.path.join(folder, riff), x)
            n = len(x)
            open(os.path.join(folder, name + ".PHN"), "w").write(
                f"0 800 h#\n800 900 q\n900 {n - 800} {phone}\n{n - 800} {n} h#\n")
    return str(root)


def cremad_folder(root, rng, actors=20):
    for a in range(actors):
        for emotion, k in (("ANG", 0), ("HAP", 1), ("SAD", 2)):
            for sentence in ("DFA", "IEO"):
                name = f"{1001 + a}_{sentence}_{emotion}_XX.wav"
                write_wav(os.path.join(root, "AudioWAV", name), tone(k, rng))
    return str(root)


INTENTS = [("activate", "lights", "kitchen"), ("increase", "volume", "none"),
           ("bring", "shoes", "none")]


def fluent_folder(root, rng, speakers=(12, 3, 6)):
    i = 0
    for split, n in zip(("train", "valid", "test"), speakers):
        rows = []
        for s in range(n):
            for k, intent in enumerate(INTENTS):
                rel = f"wavs/speakers/{split}{s}/{k}.wav"
                write_wav(os.path.join(root, rel), tone(k, rng))
                rows.append([i, rel, f"{split}{s}", " ".join(intent), *intent])
                i += 1
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        with open(os.path.join(root, "data", f"{split}_data.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "path", "speakerId", "transcription", "action", "object", "location"])
            w.writerows(rows)
    return str(root)


WRITERS = {"speechcommands": speechcommands_folder, "timit-phones": timit_folder,
           "timit-sentence": timit_folder, "cremad": cremad_folder, "fluent": fluent_folder}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, two threads make each small probe step ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return model.load_backbone("tiny", seed=0)


def test_timit_folding_table_is_lee_and_hon():
    assert len(tasks.TIMIT61) == len(set(tasks.TIMIT61)) == 61
    assert set(tasks.TIMIT39) == set(tasks.TIMIT61)
    assert len(tasks.PHONES39) == 39 and "sil" in tasks.PHONES39 and tasks.TIMIT39["q"] is None
    pairs = ("ao aa, ax ah, ax-h ah, axr er, hv hh, ix ih, el l, em m, en n, nx n, eng ng, "
             "zh sh, ux uw, bcl sil, dcl sil, gcl sil, pcl sil, tcl sil, kcl sil, h# sil, "
             "pau sil, epi sil")
    folded = dict(p.split() for p in pairs.split(", "))
    assert {p: tasks.TIMIT39[p] for p in folded} == folded
    assert all(tasks.TIMIT39[p] == p for p in tasks.TIMIT61 if p not in folded and p != "q")


def test_sphere_reads_as_its_riff_twin(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 4000)
    write_wav(str(tmp_path / "a.wav"), x)
    riff = tasks.read_sphere_or_wav(str(tmp_path / "a.wav"))
    for order in ("01", "10"):
        write_sphere(str(tmp_path / f"{order}.WAV"), x, order)
        assert torch.equal(tasks.read_sphere_or_wav(str(tmp_path / f"{order}.WAV")), riff)
    write_sphere(str(tmp_path / "8k.WAV"), x, rate=8000)
    wavfile.write(str(tmp_path / "8k.wav"), 8000, np.round(x * 32767).astype(np.int16))
    got = tasks.read_sphere_or_wav(str(tmp_path / "8k.WAV"))
    assert len(got) == 8000
    assert torch.allclose(got, tasks.read_sphere_or_wav(str(tmp_path / "8k.wav")))


@pytest.mark.parametrize("task", list(WRITERS))
def test_probe_beats_chance_on_each_published_layout(task, tiny, tmp_path):
    root = WRITERS[task](tmp_path / task, np.random.default_rng(1))
    nets = {"pretrained": tiny}
    if task == "speechcommands":
        nets["tuned"] = model.load_backbone("tiny", seed=1)
    res, table = ds.evaluate(task, root, nets, model_name="tiny", normalize=False, layers=[1, 4],
                             epochs=400, every=20)
    assert json.loads(json.dumps(res)) == res  # JSON-ready
    metric = "micro_f1" if task == "timit-phones" else "accuracy"  # chance 1/3; all-positive F1 0.5
    best = max(res["layers"][k]["pretrained"][metric]["value"] for k in res["layers"])
    assert best >= (0.65 if task == "timit-phones" else 0.6), table
    assert f"{res['layers']['4']['pretrained'][metric]['value']:.3f}" in table
    if task == "speechcommands":
        diff, layer = res["layers"]["1"]["difference"]["accuracy"], res["layers"]["1"]
        gap = layer["tuned"]["accuracy"]["value"] - layer["pretrained"]["accuracy"]["value"]
        assert diff["value"] == pytest.approx(gap) and diff["ci"][0] <= gap <= diff["ci"][1]
        assert "tuned - pretrained" in table
        ds.plot_downstream(res, task, str(tmp_path / "plot.png"))
        assert os.path.getsize(tmp_path / "plot.png") > 1000


def test_readers_split_as_published(tmp_path):
    rng = np.random.default_rng(2)
    below = tmp_path / "sc" / "SpeechCommands" / "speech_commands_v0.02"
    sc = speechcommands_folder(below, rng, (8, 2, 3))
    for root in (sc, str(tmp_path / "sc")):  # torchaudio's layout, two levels up
        t = tasks.read_task("speechcommands", root)
        sizes = {s: len(c) for s, c in t.splits.items()}
        assert t.classes == ["aa", "iy", "uw"] and sizes == {"train": 24, "valid": 6, "test": 9}
        assert not any("_background_noise_" in c.path for c in t.splits["train"])
    timit = timit_folder(tmp_path / "timit", rng)
    t = tasks.read_task("timit-sentence", timit)
    speakers = {s: {os.path.dirname(c.path) for c in clips} for s, clips in t.splits.items()}
    assert [len(speakers[s]) for s in ("train", "valid", "test")] == [9, 1, 2]
    assert all("TEST" in c.path for c in t.splits["test"])
    assert not speakers["train"] & speakers["valid"]
    assert sorted(c.label for c in t.splits["valid"]) == [0, 0, 1, 1, 2, 2]
    p = tasks.read_task("timit-phones", timit)
    assert p.multilabel and len(p.classes) == 38 and "sil" not in p.classes
    held = {tuple(p.classes[i] for i in c.label) for c in p.splits["test"]}
    assert held == {("aa",), ("iy",), ("ih",), ("uw",)}  # sil and q left out, ao ix ux folded
    t = tasks.read_task("cremad", cremad_folder(tmp_path / "cremad", rng), seed=3)
    actors = {s: {os.path.basename(c.path)[:4] for c in clips} for s, clips in t.splits.items()}
    assert [len(actors[s]) for s in ("train", "valid", "test")] == [16, 2, 2]
    assert len(set.union(*actors.values())) == 20 and t.classes == tasks.EMOTIONS
    t = tasks.read_task("fluent", fluent_folder(tmp_path / "fsc", rng, (8, 2, 3)))
    assert t.classes == sorted("/".join(i) for i in INTENTS) and len(t.splits["test"]) == 9


def unlayout(root):  # the word folders renamed like _background_noise_: no word is left
    for w in ("aa", "iy", "uw"):
        os.rename(os.path.join(root, w), os.path.join(root, "_" + w))


def drop(rel):
    def spoil(root):
        os.remove(os.path.join(root, rel))
    return spoil


def append(rel, text):
    def spoil(root):
        open(os.path.join(root, rel), "a").write(text)
    return spoil


def empty_clip(root):
    open(os.path.join(root, "iy", "spk01_nohash_0.wav"), "w").close()


def bad_emotion(root):
    write_wav(os.path.join(root, "AudioWAV", "1001_DFA_XYZ_XX.wav"), np.zeros(9))


BAD = {  # name: (task, how the good folder is spoiled, what the message names)
    "not the layout": ("speechcommands", unlayout, "not a Speech Commands folder"),
    "missing list": ("speechcommands", drop("testing_list.txt"), "testing_list.txt: missing"),
    "word without folder": ("speechcommands", append("testing_list.txt", "zz/a_nohash_0.wav\n"),
                            "testing_list.txt: zz/a_nohash_0.wav"),
    "listed file missing": ("speechcommands", append("validation_list.txt", "aa/x_nohash_0.wav\n"),
                            "x_nohash_0.wav: missing"),
    "empty audio": ("speechcommands", empty_clip, "spk01_nohash_0.wav: empty"),
    "emotion": ("cremad", bad_emotion, "1001_DFA_XYZ_XX.wav: emotion XYZ"),
    "phone": ("timit-phones", append("TRAIN/DR1/M0010/SX11.PHN", "1 2 zz\n"), "SX11.PHN: line 5"),
    "intent": ("fluent", append("data/valid_data.csv", "99,wavs/speakers/train0/0.wav,x,x,a,b,c\n"),
               "valid_data.csv: intent a/b/c"),
    "missing csv": ("fluent", drop("data/test_data.csv"), "test_data.csv: missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_in_one_line_naming_the_file(case, tmp_path):
    task, spoil, says = BAD[case]
    root = WRITERS[task](tmp_path / "d", np.random.default_rng(4))
    tasks.read_task(task, root)  # the good folder reads
    spoil(root)
    with pytest.raises(ValueError) as e:
        tasks.read_task(task, root)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_undecodable_audio_fails_at_load_naming_the_file(tiny, tmp_path):
    root = speechcommands_folder(tmp_path / "sc", np.random.default_rng(5), (2, 1, 1))
    open(os.path.join(root, "uw", "spk00_nohash_0.wav"), "wb").write(b"not audio at all")
    kw = dict(model_name="tiny", normalize=False, epochs=10)
    with pytest.raises(ValueError, match=r"--downstream-layers 9: expected layers from 1\.\.4"):
        ds.evaluate("speechcommands", root, {"pretrained": tiny}, layers=[9], **kw)
    with pytest.raises(ValueError, match="spk00_nohash_0.wav: neither NIST SPHERE"):
        ds.evaluate("speechcommands", root, {"pretrained": tiny}, layers=[1], **kw)


@pytest.mark.parametrize("arch", ["tiny", "wav2vec2"])
@pytest.mark.parametrize("normalize", [False, True])
def test_a_padded_clip_pools_as_it_does_alone(arch, normalize):
    torch.manual_seed(0)
    wavlm_only = ("encoder_num_buckets", "encoder_max_distance")
    kw = {k: v for k, v in model.TINY.items() if k not in wavlm_only}
    net = (model.build_backbone("tiny") if arch == "tiny" else wav2vec2_model(**kw)).eval()
    waves = [0.1 * torch.randn(n) for n in (8000, 5000, 6400, 8000)]
    batch = ds.pooled_layers(net, waves, [1, 2, 4], normalize)
    for i, w in enumerate(waves):
        alone = ds.pooled_layers(net, [w], [1, 2, 4], normalize)
        for layer in (1, 2, 4):
            assert torch.allclose(batch[layer][i], alone[layer][0], atol=1e-4)
        plain = model.hidden(net, w[None], 2, normalize=normalize).mean(1)[0]  # (dim,)
        assert torch.allclose(alone[2][0], plain, atol=1e-5)


def test_validation_split_not_test_split_chooses_the_epochs():
    rng = np.random.default_rng(0)
    x = {s: rng.standard_normal((200, 2)).astype(np.float32) for s in ("train", "valid", "test")}
    label = {s: (v[:, 0] > 0) ^ (s == "test") for s, v in x.items()}  # the test split is flipped
    y = {s: np.stack([~v, v], 1) for s, v in label.items()}
    fit = ds.fit_probe(x, y, False, weight_decays=(0.0, 1e-2), epochs=1000, every=50)
    assert fit.valid == max(h["valid"] for h in fit.history) and fit.valid > 0.9
    early = ds.fit_probe(x, y, False, weight_decays=(0.0,), epochs=50, every=50)

    def test_accuracy(f):
        return np.mean(f.probs.argmax(1) == label["test"])
    assert fit.epochs > 50 and test_accuracy(early) > test_accuracy(fit) + 0.3  # the test: 50


def _oracle(truth, pred, idx):  # accuracy (micro-F1) and macro-F1 of each resample, plain numpy
    out = []
    for r in idx:
        t, p = truth[r], pred[r]
        tp, nt, npred = (t & p).sum(0), t.sum(0), p.sum(0)
        seen = nt + npred > 0
        micro = 2 * tp.sum() / (nt.sum() + npred.sum())
        out.append([micro, np.mean(2 * tp[seen] / (nt + npred)[seen])])
    return np.array(out)


@pytest.mark.parametrize("multilabel", [False, True])
def test_bootstrap_interval_matches_a_numpy_oracle(multilabel):
    rng = np.random.default_rng(0)
    n, k = 60, 4
    if multilabel:
        truth = rng.random((n, k)) < 0.4
        pred = truth ^ (rng.random((n, k)) < 0.2)
    else:
        labels = rng.integers(0, k, n)
        guess = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
        truth, pred = np.eye(k, dtype=bool)[labels], np.eye(k, dtype=bool)[guess]
    got = ds.bootstrap_metrics(truth, {"a": pred}, multilabel, resamples=200, seed=3)["a"]
    idx = np.random.default_rng(3).integers(0, n, (200, n), dtype=np.int32)
    want, whole = _oracle(truth, pred, idx), _oracle(truth, pred, [np.arange(n)])[0]
    for j, m in enumerate(ds.metric_names(multilabel)):
        assert got[m]["value"] == pytest.approx(whole[j], abs=1e-6)
        assert got[m]["ci"] == pytest.approx(list(np.percentile(want[:, j], [2.5, 97.5])), abs=1e-6)


def test_paired_difference_is_zero_for_twins_and_finds_a_known_gain():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 100)
    truth = np.eye(3, dtype=bool)[labels]
    wrong = np.eye(3, dtype=bool)[(labels + 1) % 3]
    a = np.where((np.arange(100) < 60)[:, None], truth, wrong)  # 60% right
    b = np.where((np.arange(100) < 90)[:, None], truth, wrong)  # 90% right, a superset
    twins = ds.bootstrap_metrics(truth, {"pretrained": a, "tuned": a.copy()}, False)["difference"]
    assert all(twins[m]["value"] == 0 and twins[m]["ci"] == [0, 0] for m in twins)
    gain = ds.bootstrap_metrics(truth, {"pretrained": a, "tuned": b}, False)["difference"]
    gain = gain["accuracy"]
    assert gain["value"] == pytest.approx(0.3) and 0.15 < gain["ci"][0] < 0.3 < gain["ci"][1] < 0.45


def test_limit_covers_the_classes_deterministically():
    clips = [tasks.Clip(f"{i}.wav", i % 5) for i in range(100)]
    first = tasks.limit_clips(clips, 10, seed=0)
    assert first == tasks.limit_clips(clips, 10, seed=0) and len(first) == 10
    assert sorted(c.label for c in first) == sorted(list(range(5)) * 2)
    assert tasks.limit_clips(clips, None) is clips


def test_features_are_cached_and_one_forward_fills_every_layer(tiny, tmp_path, monkeypatch):
    root = speechcommands_folder(tmp_path / "sc", np.random.default_rng(6), (2, 1, 1))
    clips = tasks.read_task("speechcommands", root).splits["train"]
    calls = []
    real = ds.pooled_layers

    def counted(*a, **k):
        calls.append(a[2])
        return real(*a, **k)
    monkeypatch.setattr(ds, "pooled_layers", counted)
    kw = dict(normalize=False, batch_size=4, name="t")
    first = ds.clip_features(tiny, clips, {"k": 1}, [1, 3], **kw)
    assert calls == [[1, 3], [1, 3]]  # 6 clips in batches of 4, every layer at once
    again = ds.clip_features(tiny, clips, {"k": 1}, [3, 4], **kw)
    assert calls[2:] == [[4], [4]] and np.array_equal(first[3], again[3])  # only layer 4 is new
    assert first[1].shape == (6, model.TINY["encoder_embed_dim"])


def test_words_to_speechcommands_splits_by_story(tmp_path):
    demo = synthetic.make_demo(str(tmp_path / "demo"), n_subjects=1, n_stories=2, n_voxels=3,
                               seconds=30.0)
    out = str(tmp_path / "words")
    tasks.main(["words", demo, out])
    t = tasks.read_task("speechcommands", out)
    story = {s: {os.path.basename(c.path).split("_nohash_")[0] for c in clips}
             for s, clips in t.splits.items()}
    assert story["test"] == {"wheretheressmoke"} and len(story["valid"]) == 1
    assert not story["train"] & (story["valid"] | story["test"]) and len(t.classes) > 5
    sr, x = wavfile.read(t.splits["valid"][0].path)
    assert sr == 16000 and x.shape == (16000,) and x.dtype == np.int16 and np.abs(x).max() > 1000
    with pytest.raises(ValueError, match="already exists"):
        tasks.main(["words", demo, out])  # the folder exists: refused
