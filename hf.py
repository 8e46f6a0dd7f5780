r"""
A braintune backbone (a torchaudio Wav2Vec2Model of the wav2vec2, HuBERT or WavLM family, tuned
or not) exported as a Hugging Face transformers checkpoint of its family, so that the tools the
papers judge a model with (s3prl's SUPERB tasks, transformers pipelines) can read it:

    backbone = model.load_backbone("wavlm_base_plus", weights="runs/x/backbone.pt")
    export_hf(backbone, "wavlm_base_plus", "runs/x/hf",
              normalize=model.normalizes("wavlm_base_plus"))
    hf = transformers.AutoModel.from_pretrained("runs/x/hf")        # a WavLMModel, in eval mode

The folder holds config.json and model.safetensors (save_pretrained) and preprocessor_config.json
(a Wav2Vec2FeatureExtractor whose do_normalize says whether braintune layer-normalised the wave).
The key map is the inverse of torchaudio's import_huggingface_model; LoRA adapters still in the
backbone are merged into a copy first. Dropout and LayerDrop are 0 and SpecAugment is off in the
config: the export is for frozen feature extraction. transformers is optional, imported here only.

What transformers 5.24 returns: hidden_states[0] is the transformer's input (pos conv added, and
for post-LN models the encoder layer norm: torchaudio's encoder.transformer._preprocess),
hidden_states[k] is layer k's output = braintune's extract_features(wave)[0][k - 1], un-normalised
also for pre-LN (do_stable_layer_norm) models; last_hidden_state is backbone(wave)[0], with the
final layer norm of pre-LN models. (transformers 4.x put the normed one at hidden_states[-1].)
braintune never pads nor masks: batches of equal length match it exactly. The feature extractor's
normalisation uses eps 1e-7 where F.layer_norm uses 1e-5: a constant gain on the wave, which the
bias-free CNN and its first norm remove (every bundle and tiny have conv bias off).

Running a SUPERB task on the export with s3prl (github.com/s3prl/s3prl at ec8064b5, 2025-06-13):
  s3prl reads a Hugging Face folder through two upstreams only: hf_wav2vec2_custom
  (s3prl/upstream/hf_wav2vec2/hubconf.py:4; its expert.py calls Wav2Vec2FeatureExtractor and
  Wav2Vec2Model .from_pretrained(ckpt)) and hf_hubert_custom (s3prl/upstream/hf_hubert/
  hubconf.py:4; HubertModel). ckpt is the -k / --upstream_ckpt flag (s3prl/run_downstream.py:62,
  handed over as ckpt= by Runner._get_upstream, s3prl/downstream/runner.py:120-150). Keyword
  spotting (KS: Speech Commands v0.01, its paths set in s3prl/downstream/speech_commands/
  config.yaml), run in s3prl/s3prl:
    python3 run_downstream.py -m train -n bt_ks -u hf_wav2vec2_custom -k /abs/runs/x/hf \
        -d speech_commands                                     # a wav2vec2 export
    python3 run_downstream.py -m train -n bt_ks -u hf_hubert_custom -k /abs/runs/x/hf \
        -d speech_commands                                     # a HuBERT export
    python3 run_downstream.py -m evaluate -e result/downstream/bt_ks/dev-best.ckpt
  WavLM has no Hugging Face upstream in s3prl: wavlm_local -k FILE (s3prl/upstream/wavlm/
  hubconf.py:19) wants Microsoft's original checkpoint file ({"cfg", "model"} for unilm's WavLM
  classes), not this folder; hf_wav2vec2_custom would load it into a Wav2Vec2Model, dropping
  WavLM's gated relative position bias. What works: customized_upstream (s3prl/upstream/example/
  hubconf.py:4), with s3prl/upstream/example/expert.py replaced by a copy of
  hf_wav2vec2/expert.py that imports WavLMModel instead of Wav2Vec2Model, then
    python3 run_downstream.py -m train -n bt_ks -u customized_upstream -k /abs/runs/x/hf \
        -d speech_commands                                     # a WavLM export (or tiny)
  Both hf experts hard-code get_downsample_rates() = 320 (expert.py:27), and Featurizer.tolist
  (s3prl/upstream/interfaces.py:250-259) asserts the frame count is within 5 of len(wave) / rate:
  tiny's 640-sample hop fails that, so for tiny the copied expert must return 640. The hf experts
  always pass an attention mask; padded batches then differ slightly from braintune's, unmasked.
"""
import os
import shutil
import tempfile

import torch
import torchaudio

import lora
import model

HF_CLASSES = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert", "wavlm": "WavLM"}  # -> class prefix
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                  apply_spec_augment=False, mask_time_prob=0.0, mask_feature_prob=0.0)
PREFIXES = {"encoder.feature_projection.": "feature_projection.",  # torchaudio -> transformers
            "encoder.transformer.": "encoder."}  # feature_extractor.* is the same on both sides
WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0",  # torch.nn.utils.weight_norm's
               "weight_v": "parametrizations.weight.original1"}  # names -> the parametrization's


def hf_family(name):
    """"wav2vec2", "hubert" or "wavlm": the transformers family of braintune's model `name`."""
    if name != "tiny" and name not in model.BUNDLES:
        raise ValueError(f"unknown model {name!r}; choose tiny or one of "
                         f"{', '.join(model.BUNDLES)}")
    if name == "tiny" or getattr(torchaudio.pipelines, model.BUNDLES[name])._model_type == "WavLM":
        return "wavlm"
    return "hubert" if name.startswith("hubert") else "wav2vec2"


def builder_params(name):
    """The torchaudio builder kwargs of `name` (wavlm_model or wav2vec2_model)."""
    hf_family(name)  # checks the name
    if name == "tiny":
        return dict(model.TINY)
    return dict(getattr(torchaudio.pipelines, model.BUNDLES[name])._params)


def require_transformers():
    """The transformers module, an optional dependency."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--export-hf needs transformers: pip install transformers") from None
    return transformers


def hf_config(family, params):
    """The transformers config of `family` equal to torchaudio builder kwargs `params` (the
    inverse of torchaudio's _get_config / _get_config_wavlm), for evaluation: no dropout, no
    masking."""
    assert params["extractor_mode"] in ("group_norm", "layer_norm"), params["extractor_mode"]
    transformers = require_transformers()
    conv = params["extractor_conv_layer_config"]  # [(channels, kernel, stride)] per CNN layer
    kw = dict(
        feat_extract_norm=params["extractor_mode"].removesuffix("_norm"),  # "group" | "layer"
        conv_dim=[c for c, _, _ in conv], conv_kernel=[k for _, k, _ in conv],
        conv_stride=[s for _, _, s in conv], num_feat_extract_layers=len(conv),
        conv_bias=params["extractor_conv_bias"], hidden_size=params["encoder_embed_dim"],
        num_conv_pos_embeddings=params["encoder_pos_conv_kernel"],
        num_conv_pos_embedding_groups=params["encoder_pos_conv_groups"],
        num_hidden_layers=params["encoder_num_layers"],
        num_attention_heads=params["encoder_num_heads"],
        intermediate_size=params["encoder_ff_interm_features"],
        do_stable_layer_norm=params["encoder_layer_norm_first"], **NO_DROPOUT)
    if family == "wavlm":
        kw.update(num_buckets=params["encoder_num_buckets"],
                  max_bucket_distance=params["encoder_max_distance"])
    if family == "hubert":  # torchaudio's FeatureProjection always has its layer norm
        kw.update(feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    return getattr(transformers, f"{HF_CLASSES[family]}Config")(**kw)


def hf_state(state, family, num_layers):
    """torchaudio state dict -> transformers state dict of the same model (float32, CPU): the
    inverse of import_huggingface_model's map, WavLM's fused q/k/v split into q/k/v_proj."""
    out = {}
    for key, value in state.items():
        assert not key.startswith("aux."), "a CTC head has no place in the exported encoder"
        for old, new in PREFIXES.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        for old, new in WEIGHT_NORM.items():
            if key.endswith(f".conv.{old}"):
                key = key.removesuffix(old) + new
        out[key] = value.detach().to("cpu", torch.float32)
    if family == "wavlm":  # rel_attn_embed (layer 0 only) and gru_rel_pos_* keep their names
        for i in range(num_layers):
            attn = f"encoder.layers.{i}.attention"
            for part in ("weight", "bias"):
                q, k, v = out.pop(f"{attn}.attention.in_proj_{part}").chunk(3)  # (dim, ...) each
                out[f"{attn}.q_proj.{part}"] = q
                out[f"{attn}.k_proj.{part}"] = k
                out[f"{attn}.v_proj.{part}"] = v
                out[f"{attn}.out_proj.{part}"] = out.pop(f"{attn}.attention.out_proj.{part}")
    return {k: v.clone().contiguous() for k, v in out.items()}  # no views shared between tensors


def match_weight_norm(state, keys):
    """Rename the positional conv's weight-norm tensors to the form the transformers model holds
    (parametrizations.weight.original0/1, or weight_g/v on a torch without parametrizations)."""
    out = {}
    for key, value in state.items():
        for old, new in WEIGHT_NORM.items():
            if key not in keys and key.endswith(new) and key.removesuffix(new) + old in keys:
                key = key.removesuffix(new) + old
        out[key] = value
    return out


def export_hf(backbone, name, out_dir, *, normalize, params=None):
    """Write `backbone` (a torchaudio model of braintune's architecture `name`; LoRA adapters are
    merged into a copy) into the new folder out_dir as a transformers checkpoint of its family
    (config.json, model.safetensors) plus preprocessor_config.json with do_normalize=normalize.
    params: the torchaudio builder kwargs, by default those of `name`. Atomic: the folder is
    written under a temporary name beside out_dir and renamed; nothing is left on failure.
    Returns the transformers model (eval mode)."""
    family, params = hf_family(name), params or builder_params(name)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: the export folder exists and is not empty; give a new one")
    transformers = require_transformers()
    if getattr(backbone, "aux", None) is not None:
        raise ValueError(f"--export-hf: the {name} backbone has a CTC head; export the encoder")
    state = backbone.state_dict()
    if any(".lora_" in k for k in state):
        state = lora.merged_copy(backbone).state_dict()
    config = hf_config(family, params)
    hf = getattr(transformers, f"{HF_CLASSES[family]}Model")(config).eval()
    keys = set(hf.state_dict())
    try:
        state = match_weight_norm(hf_state(state, family, config.num_hidden_layers), keys)
    except KeyError as e:  # e.g. a wav2vec2 backbone under a WavLM name
        raise ValueError(f"--export-hf: the backbone is not a {name}: no {e.args[0]}") from None
    missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
    if missing or unexpected:
        raise ValueError(f"--export-hf: the backbone does not fit the {name} architecture "
                         f"({len(missing)} weights missing, e.g. {missing[:1]}; {len(unexpected)} "
                         f"unexpected, e.g. {unexpected[:1]})")
    try:
        hf.load_state_dict(state)
    except RuntimeError as e:  # a shape differs: the first "size mismatch for ..." line
        first = str(e).strip().splitlines()[1 if len(str(e).splitlines()) > 1 else 0].strip()
        raise ValueError(f"--export-hf: the backbone does not fit the {name} architecture "
                         f"({first})") from None
    extractor = transformers.Wav2Vec2FeatureExtractor(  # masks only for layer-norm CNNs, as in HF
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=normalize,
        return_attention_mask=config.feat_extract_norm == "layer")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp", dir=os.path.dirname(out_dir))
    try:
        hf.save_pretrained(tmp)
        extractor.save_pretrained(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf
