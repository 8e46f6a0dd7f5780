"""model.py: backbones and their weights, TR bins, the papers' protocol features, heads, tiny."""
import numpy as np
import pytest
import torch

import config
import data
from test_data import write_story
from dist import uses_bf16
from features import PROTOCOLS, Protocol, delayed, lanczos, protocol_features, stride_frames
from model import keep_freed_memory, load_backbone, make_head, pool_frames, pretrain_tiny


def test_weights_flag_loads_and_reports_bad_files(tmp_path):
    model = load_backbone("tiny", seed=3)
    path = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), path)
    loaded = load_backbone("tiny", weights=path, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values()))
    with pytest.raises(ValueError, match="nope.pt: no such file"):
        load_backbone("tiny", weights=str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt: not a readable PyTorch checkpoint"):
        load_backbone("tiny", weights=str(tmp_path / "bad.pt"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: the weights do not fit the tiny architecture"):
        load_backbone("tiny", weights=str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="unknown model 'gpt2'"):
        load_backbone("gpt2")


def test_bottleneck_head_is_the_best_rank_k_approximation():
    W = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    head = make_head(W.float(), bottleneck=5)
    got = (head[1].weight @ head[0].weight).T.double().detach()  # (p, v), as W
    U, s, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    want = (U[:, :5] * s[:5]) @ Vh[:5]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)  # a float32 SVD
    full = make_head(W.float())
    x = torch.randn(3, 40)
    torch.testing.assert_close(full(x).detach(), x @ W.float())


def test_failed_bundle_download_names_file_cache_and_flag(monkeypatch, tmp_path):
    import urllib.error

    import torchaudio

    def offline(dl_kwargs):
        # what torch.hub raises here; nothing is contacted
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(type(torchaudio.pipelines.WAVLM_BASE_PLUS), "_get_state_dict", lambda self,
                        kw: offline(kw))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ValueError,
                       match=r"wavlm_base_plus.pth is not in .*checkpoints .*--weights PATH"):
        load_backbone("wavlm_base_plus")


def test_backbone_dropout_replaces_the_bundles_own():
    import torchaudio
    params = torchaudio.pipelines.HUBERT_BASE._params
    state = torchaudio.models.wav2vec2_model(**params).state_dict()
    keep = load_backbone("hubert_base", weights=state)
    off = load_backbone("hubert_base", weights=state, dropout=0.0)
    p = lambda m: sorted({x.p for x in m.modules() if isinstance(x, torch.nn.Dropout)} |
                         {m.encoder.transformer.layers[0].attention.dropout})
    assert p(keep) == [0.0, 0.1] and p(off) == [0.0]  # the bundle's: 0.1 (its ff dropout is 0)
    assert keep.encoder.transformer.layer_drop == off.encoder.transformer.layer_drop == 0.0


def test_keep_freed_memory_keeps_a_large_freed_tensor():
    def rss():  # MB
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
        return int(line.split()[1]) // 1024
    keep_freed_memory()
    x = torch.ones(64 << 18)  # 64 MB, above glibc's largest default heap block (32 MB)
    held = rss()
    del x
    # kept for the next step, not unmapped (glibc's default drops all 64 MB)
    assert rss() > held - 32


def test_tiny_pretraining_learns_to_name_phones(demo):
    audio = data.load_audio(demo, data.splits(demo, "UTS01")["train"])
    _, first = pretrain_tiny(demo, audio, epochs=1)
    state, last = pretrain_tiny(demo, audio, epochs=4)
    # measured: 0.32 after one epoch (pauses are ~0.3), 0.61 after four
    assert last > 0.5 and last > first + 0.15
    model = load_backbone("tiny", state)  # loads strictly into the tiny architecture
    assert torch.equal(model.state_dict()["encoder.feature_projection.projection.weight"],
                       state["encoder.feature_projection.projection.weight"])


def test_precision_bf16_only_on_a_gpu_and_fp32_turns_it_off(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    native = {True: False, False: True}  # including_emulation -> is bf16 supported (an A100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        native[including_emulation])
    assert uses_bf16(cuda) and uses_bf16(cuda, "auto") and not uses_bf16(cuda, "fp32")
    native[False] = False  # a T4 or V100: bf16 only emulated, so float32
    assert not uses_bf16(cuda)
    assert not uses_bf16(cpu) and not uses_bf16(cpu, "auto")
    assert config.parse(["--precision",
                         "fp32"]).precision == "fp32" and config.parse([]).precision == "auto"


def test_pool_frames_bins_are_delays():
    frames = torch.arange(12.0).reshape(1, 12, 1)  # time runs forward
    out = pool_frames(frames, 3)[0, :, 0]
    assert out.tolist() == [9.5, 5.5, 1.5]  # bin 0 is the most recent audio


def test_lanczos_is_the_huth_labs_formula_and_a_low_pass_filter():
    rng = np.random.default_rng(0)
    old = np.sort(rng.uniform(0, 60, 500))
    new = data.row_times(20, tr=2.0, trim_start=0, sound_start=0.0)
    x = rng.standard_normal((500, 3))

    def lanczosfun(t, window=3):  # the Huth lab's lanczosfun, cutoff 1 / TR
        t = t / 2.0
        val = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi ** 2 * t ** 2)
        val[t == 0], val[np.abs(t) > window] = 1.0, 0.0
        return val
    want = np.stack([lanczosfun(n - old) for n in new]) @ x
    np.testing.assert_allclose(lanczos(torch.tensor(x), old, new, 2.0).numpy(), want, rtol=1e-10,
                               atol=1e-12)
    grid, trs = np.arange(0, 300, 0.1), data.row_times(140, tr=2.0, trim_start=0, sound_start=0.0)
    for hz, survives in ((0.05, True), (0.4, False)):  # the TR's Nyquist frequency is 0.25 Hz
        y = lanczos(torch.tensor(np.sin(2 * np.pi * hz * grid))[:, None], grid, trs, 2.0)[10:-10,
                                                                                          0].numpy()
        truth = np.sin(2 * np.pi * hz * trs[10:-10])
        if survives:
            assert np.corrcoef(y, truth)[0, 1] > 0.999
        else:  # 20 samples a TR add up to about 20 times the amplitude of what passes
            assert y.std() < 0.02 * 20 * truth.std()


def test_delays_shift_whole_rows_with_zeros_before_the_story():
    x = torch.arange(1.0, 13.0).reshape(6, 2)
    d = delayed(x, (1, 2, 3, 4))  # (6, 8)
    for t in range(6):
        for k, lag in enumerate((1, 2, 3, 4)):
            want = x[t - lag] if t - lag >= 0 else torch.zeros(2)
            assert torch.equal(d[t, 2 * k:2 * k + 2], want)


class Energy:
    """A stand-in extractor whose feature is each frame's energy (or zero), uncached."""

    def __init__(self, hop, silent=False):
        self.hop, self.silent = hop, silent

    def hidden(self, w):  # (batch, samples) -> (batch, frames, 1)
        frames = w[:, :w.shape[1] // self.hop * self.hop].abs().reshape(len(w), -1, self.hop)
        return frames.mean(-1, keepdim=True) * (0 if self.silent else 1)

    def key(self):
        return None


@pytest.mark.parametrize("protocol", ["moussa2025", "brainwavlm"])
def test_a_click_reaches_the_rows_the_stride_lanczos_and_delays_imply(tmp_path, protocol):
    """With a local feature (each frame's energy), a click at c becomes one frame, Lanczos spreads
    it over 3 TRs each way, and the delays put TR r-d into row r: the undelayed peak is at the row
    nearest c, and the first row reached is the first within 2 TRs (plus a stride) before c."""
    click, hop, p = 61.3, 320, PROTOCOLS[protocol]
    write_story(tmp_path, "story", 150.0, 60, click=click)
    waves = data.load_audio(str(tmp_path), ["story"])
    win = data.Windows(waves, {"story": 60}, ["story"], history=1)
    p = Protocol(protocol, 1, p["context"], p["stride"], list(p["delays"]), p["test_skip"])
    energy, cpu = Energy(hop), torch.device("cpu")
    times, frames = stride_frames(energy.hidden, waves["story"], hop, p, cpu, batch_size=64)
    # 1 frame apart, or 1.5 where a stride is not whole frames (0.25 s)
    gaps = np.diff(times) * data.SR / hop
    assert set(np.round(gaps, 6)) <= {1.0, 1.5}
    assert times[int(frames[:, 0].argmax())] == pytest.approx(click, abs=0.02)
    t = data.row_times(60)
    undelayed = lanczos(frames - frames.mean(), times, t, data.TR)[:, 0]
    assert abs(t[int(undelayed.argmax())] - click) <= data.TR / 2
    x = protocol_features(energy, win, p, cpu, batch_size=64)
    x0 = protocol_features(Energy(hop, silent=True), win, p, cpu, batch_size=64)
    assert x.shape == (60, 4) and torch.equal(x0, torch.zeros(60, 4))
    # row 0's delayed blocks are the zeros before the story; row 1 holds TR 0: silence
    silence = x[1, 0]
    # delay 1: TR r-1 in row r
    reached = np.flatnonzero((x[1:, 0] - silence).abs().numpy() > 1e-6) + 1
    first = t[reached[0]]
    assert click - 2 * data.TR - p.stride <= first < click - 2 * data.TR + data.TR


def test_mean_pooling_is_the_mean_of_the_windows_frames_and_keys_its_own_features():
    from model import Extractor, load_backbone
    backbone = load_backbone("tiny", seed=0)
    bins, mean = Extractor("tiny", backbone, 3), Extractor("tiny", backbone, 3, pool="mean")
    wave = torch.randn(2, 16000 * 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = mean.hidden(wave)  # (2, frames, 64)
        torch.testing.assert_close(mean.pooled(wave, 3), frames.mean(1))
        torch.testing.assert_close(bins.pooled(wave, 3), pool_frames(frames, 3).flatten(1))
    assert mean.pooled(wave, 3).shape == (2, 64) and bins.pooled(wave, 3).shape == (2, 3 * 64)
    assert bins.key() != mean.key() and mean.key()["pool"] == "mean"
    assert bins.key()["pool"] == "bins"  # every key names its pooling


class FrameIndex:
    """A stand-in extractor whose feature is each frame's index within its snippet."""
    hop = 320

    def hidden(self, w):  # (batch, samples) -> (batch, frames, 1)
        n = w.shape[1] // self.hop
        return torch.arange(n, dtype=torch.float32)[None, :, None].expand(len(w), n, 1)


def test_frame_first_keeps_each_snippets_first_frame_at_its_end():
    wave, cpu = np.zeros(16000 * 10, np.float32), torch.device("cpu")
    last = Protocol("brainwavlm", 1, 3.75, 0.25, [1], 0)
    first = Protocol("brainwavlm", 1, 3.75, 0.25, [1], 0, "first")
    t_last, x_last = stride_frames(FrameIndex().hidden, wave, 320, last, cpu, batch_size=16)
    t_first, x_first = stride_frames(FrameIndex().hidden, wave, 320, first, cpu, batch_size=16)
    ends = np.arange(0.25, 10.0 + 0.25, 0.25)  # one snippet every stride, labelled at its end
    np.testing.assert_allclose(t_first, ends[:len(t_first)])
    assert len(t_first) == 40 and torch.equal(x_first, torch.zeros(40, 1))  # frame 0 of each
    assert x_last.min() > 180 and len(t_last) > len(t_first)  # 200 frames: the last stride's


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["tiny", "wav2vec2_base", "hubert_base", "wavlm_base_plus"])
@pytest.mark.parametrize("bottleneck", [0, 5])
def test_the_model_is_built_on_the_device_it_trains_on(name, bottleneck, device):
    """The meta device stands in for a GPU: a backbone already there gets its adapters (q k v o,
    WavLM's fused q k v included), its layer weights and its heads there too, and a training
    forward with LoRA dropout and a backward run without a tensor left on the CPU."""
    import model
    with torch.device(device):  # the architecture made on the device (meta: no memory spent)
        backbone = model.build_backbone(name)
    normalize = model.normalizes(name)
    extractor = model.Extractor(name, backbone, 2, normalize, weighted=True)
    model.add_adapters(backbone, 2, 4, 4.0, 0.1, "qkvo", weighted=True)
    p = 4 * config.architecture(name)["encoder_embed_dim"]  # 4 TR bins of the layer's width
    heads = [make_head(torch.randn(p, 30, device=device), bottleneck) for _ in range(2)]
    net = model.BrainModel(extractor, heads, torch.zeros(p, device=device),
                           torch.ones(p, device=device), 4).train()
    preds = net(torch.randn(2, 4 * 16000, device=device))
    sum(y.sum() for y in preds).backward()
    trainable = [(n, q) for n, q in net.named_parameters() if q.requires_grad]
    assert any(".lora_" in n for n, _ in trainable) and any("heads." in n for n, _ in trainable)
    assert all(q.device.type == device and q.grad is not None for _, q in trainable)
    assert [y.shape for y in preds] == [(2, 30), (2, 30)]
