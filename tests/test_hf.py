"""hf.export_hf: the transformers checkpoint loads with AutoModel and equals the torchaudio
backbone layer by layer (also LoRA-tuned, also through the saved feature extractor's
normalisation); torchaudio's own importer brings it back to the same state dict; a used folder is
refused and a failed export leaves nothing."""
import copy
import os
import sys

import pytest
import torch
from torchaudio.models import wav2vec2_model, wavlm_model
from torchaudio.models.wav2vec2.utils import import_huggingface_model

import hf
import lora
import model

transformers = pytest.importorskip("transformers")  # optional: only --export-hf needs it

SMALL = dict(  # every family shrunk: 3 CNN layers (hop 20), 2 layers of dim 32, 2 heads
    extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 2, 2)], encoder_embed_dim=32,
    encoder_num_layers=2, encoder_num_heads=2, encoder_ff_interm_features=64,
    encoder_pos_conv_kernel=8, encoder_pos_conv_groups=4, encoder_layer_drop=0.0)
CASES = {  # bundle -> what it covers
    "wav2vec2_base": {},  # Wav2Vec2Model, group-norm CNN, post-LN
    "hubert_large": dict(extractor_conv_bias=True),  # HubertModel, layer-norm CNN with bias, pre-LN
    "wavlm_base_plus": dict(encoder_num_buckets=16, encoder_max_distance=64),  # WavLM, post-LN
    "wavlm_large": dict(encoder_num_buckets=16, encoder_max_distance=64),  # WavLM, pre-LN
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a loaded 2-core machine a second thread only waits its turn (the
    LoRA test took 8 s on two threads, 0.7 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_backbone(name, seed=0):
    """A random torchaudio model of `name`'s family and options at SMALL size, every parameter
    moved off its init (so that a swapped layer norm or a dropped bias shows), and its kwargs."""
    torch.manual_seed(seed)
    params = dict(hf.builder_params(name), **SMALL, **CASES[name])
    build = wavlm_model if hf.hf_family(name) == "wavlm" else wav2vec2_model
    backbone = build(**params)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return backbone.eval(), params


def assert_same_layers(backbone, hf_model, wave):
    """Every hidden state transformers returns equals braintune's within 1e-4: hidden_states[0] is
    the transformer's input, hidden_states[k] layer k, last_hidden_state the encoder's output."""
    with torch.no_grad():
        out = hf_model(wave, output_hidden_states=True)
        layers = backbone.extract_features(wave)[0]  # [(batch, frames, dim)] per layer
        x, _ = backbone.feature_extractor(wave, None)
        first = backbone.encoder.transformer._preprocess(backbone.encoder.feature_projection(x))
        last = backbone(wave)[0]
    assert len(out.hidden_states) == len(layers) + 1
    for theirs, ours in zip(out.hidden_states, [first, *layers]):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.last_hidden_state, last, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_small_models_of_each_family_match_and_import_back(tmp_path, name):
    backbone, params = small_backbone(name)
    hf.export_hf(backbone, name, tmp_path / "hf", normalize=False, params=params)
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    family = {"wavlm": "WavLMModel", "hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}
    assert type(loaded).__name__ == family[hf.hf_family(name)]
    assert not loaded.training
    assert loaded.config.do_stable_layer_norm == params["encoder_layer_norm_first"]
    assert_same_layers(backbone, loaded, torch.randn(2, 2000))
    ours = backbone.state_dict()  # torchaudio's own importer gives back the very same tensors
    theirs = import_huggingface_model(loaded).state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_tiny_exports_as_a_wavlm_of_its_size(tmp_path):
    torch.manual_seed(0)
    backbone, normalize = model.build_backbone("tiny"), model.normalizes("tiny")
    hf.export_hf(backbone.eval(), "tiny", tmp_path / "hf", normalize=normalize)
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    c = loaded.config
    assert type(c).__name__ == "WavLMConfig"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (64, 4, 4)
    assert (c.num_buckets, c.max_bucket_distance) == (32, 128)
    assert (c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups) == (16, 4)
    conv = list(zip(c.conv_dim, c.conv_kernel, c.conv_stride))
    assert conv == model.TINY["extractor_conv_layer_config"]
    assert (c.feat_extract_norm, c.do_stable_layer_norm, c.conv_bias) == ("group", False, False)
    assert (c.layerdrop, c.hidden_dropout, c.attention_dropout) == (0, 0, 0)
    assert (c.apply_spec_augment, c.mask_time_prob) == (False, 0)
    assert not hasattr(loaded, "masked_spec_embed")
    assert_same_layers(backbone, loaded, torch.randn(1, 16000))


def test_lora_tuned_tiny_exports_its_adapted_layers(tmp_path):
    torch.manual_seed(0)
    backbone = model.build_backbone("tiny")
    plain = copy.deepcopy(backbone).eval()
    model.add_adapters(backbone, 4, 4, 4.0, 0.0, "qkvo")
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    backbone.eval()
    wave = torch.randn(1, 8000)
    with torch.no_grad():
        adapted = backbone.extract_features(wave)[0]  # [(batch, frames, dim)] per layer
        moved = (adapted[-1] - plain.extract_features(wave)[0][-1]).abs().max()
    assert moved > 1e-2  # the adapters change the model, so a dropped adapter would show
    hf.export_hf(backbone, "tiny", tmp_path / "unmerged", normalize=False)  # merges a copy itself
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "unmerged")
    assert_same_layers(backbone, loaded, wave)
    assert any(".lora_" in k for k in backbone.state_dict())  # the caller's keeps its adapters
    # a plain deepcopy shares torch's parametrized class: merging it breaks `backbone` (merged_copy)
    merged = lora.merge_lora(copy.deepcopy(backbone))
    hf.export_hf(merged, "tiny", tmp_path / "merged", normalize=False)
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "merged")
    assert_same_layers(merged, loaded, wave)
    with torch.no_grad():
        theirs = loaded(wave, output_hidden_states=True).hidden_states[1:]
    for a, b in zip(theirs, adapted):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # inside transformers
def test_preprocessor_config_normalises_the_wave_as_braintune_does(tmp_path):
    backbone, params = small_backbone("wavlm_large")
    hf.export_hf(backbone, "wavlm_large", tmp_path / "hf", normalize=True, params=params)
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    assert type(extractor).__name__ == "Wav2Vec2FeatureExtractor"
    assert (extractor.do_normalize, extractor.sampling_rate) == (True, 16000)
    assert extractor.return_attention_mask  # a layer-norm CNN: masks, as transformers advises
    wave = 0.05 * torch.randn(2, 2000)  # speech-like level: the eps differ (HF 1e-7, ours 1e-5)
    inputs = extractor(list(wave.numpy()), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf")
        theirs = loaded(**inputs, output_hidden_states=True)
        for layer in (1, 2):
            ours = model.hidden(backbone, wave, layer, normalize=True)  # (batch, frames, dim)
            torch.testing.assert_close(theirs.hidden_states[layer], ours, rtol=0, atol=1e-4)


def test_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    backbone, params = small_backbone("wav2vec2_base")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        hf.export_hf(backbone, "wav2vec2_base", full, normalize=False, params=params)
    assert os.listdir(full) == ["keep.txt"]
    with pytest.raises(ValueError, match="does not fit the wav2vec2_base architecture"):
        hf.export_hf(backbone, "wav2vec2_base", tmp_path / "x", normalize=False,
                     params=dict(params, encoder_ff_interm_features=48))
    with pytest.raises(ValueError, match="is not a wavlm_base"):
        hf.export_hf(backbone, "wavlm_base", tmp_path / "x", normalize=False,
                     params=dict(params, **CASES["wavlm_base_plus"]))
    with pytest.raises(ValueError, match="weights missing"):
        hf.export_hf(backbone, "wav2vec2_base", tmp_path / "x", normalize=False,
                     params=dict(params, encoder_num_layers=3))

    def broken(self, folder, **kwargs):  # the disk fills up after the weights are written
        raise OSError("no space left on device")
    monkeypatch.setattr(transformers.Wav2Vec2FeatureExtractor, "save_pretrained", broken)
    with pytest.raises(OSError, match="no space"):
        hf.export_hf(backbone, "wav2vec2_base", tmp_path / "out", normalize=False, params=params)
    assert sorted(os.listdir(tmp_path)) == ["full"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.undo()
    hf.export_hf(backbone, "wav2vec2_base", empty, normalize=False, params=params)  # empty is fine
    written = ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert sorted(os.listdir(empty)) == written


def test_missing_transformers_or_unknown_model_is_one_clear_error(tmp_path, monkeypatch):
    backbone, params = small_backbone("wav2vec2_base")
    with pytest.raises(ValueError, match="unknown model 'wavlm_huge'"):
        hf.export_hf(backbone, "wavlm_huge", tmp_path / "hf", normalize=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ValueError, match="needs transformers: pip install transformers"):
        hf.export_hf(backbone, "wav2vec2_base", tmp_path / "hf", normalize=False, params=params)
    assert not os.listdir(tmp_path)
