"""
The model: a torchaudio speech backbone (wav2vec2, HuBERT or WavLM) read at one transformer layer,
its frames averaged into the TR bins of each fMRI frame's window, and a linear head per subject from
those features to voxels. What turns audio into predicted voxels, and nothing of the run.

    backbone, normalize = load_backbone("wavlm_base_plus")      # torchaudio's pretrained weights
    model = BrainModel(backbone, [make_head(W)], mu, sd, layer=9, history=4, normalize=normalize)
    voxels = model(wave)[0]                                     # (batch, samples) at 16 kHz -> (batch, voxels)
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from torchaudio.models import wav2vec2_model, wavlm_model

import data

BUNDLES = {"wav2vec2_base": "WAV2VEC2_BASE", "wav2vec2_large": "WAV2VEC2_LARGE", "hubert_base": "HUBERT_BASE",
           "hubert_large": "HUBERT_LARGE", "wavlm_base": "WAVLM_BASE", "wavlm_base_plus": "WAVLM_BASE_PLUS",
           "wavlm_large": "WAVLM_LARGE"}
TINY = dict(  # a small WavLM: the real classes, but 40 ms frames (stride 640, not 320) for a fast laptop demo
    extractor_mode="group_norm", extractor_conv_layer_config=[(32, 40, 20), (32, 4, 4), (32, 2, 2), (32, 2, 2), (32, 2, 2)],
    extractor_conv_bias=False, encoder_embed_dim=64, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4, encoder_num_layers=4, encoder_num_heads=4, encoder_num_buckets=32,
    encoder_max_distance=128, encoder_attention_dropout=0.0, encoder_ff_interm_features=128,
    encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
    aux_num_out=None)


# -----------------------------------------------------------------------------
# the backbone

def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


DROPOUTS = ("encoder_projection_dropout", "encoder_attention_dropout", "encoder_dropout", "encoder_ff_interm_dropout")


def build_backbone(name, dropout=None):
    """The architecture of `name` with random weights, and whether its bundle layer-normalises the
    wave. dropout replaces the bundle's own dropout probabilities (active in training mode only);
    LayerDrop is always off, so that every layer the head reads is computed."""
    if name != "tiny" and name not in BUNDLES:
        raise ValueError(f"unknown model {name!r}; choose tiny or one of {', '.join(BUNDLES)}")
    override = dict(encoder_layer_drop=0.0, **({k: dropout for k in DROPOUTS} if dropout is not None else {}))
    if name == "tiny":
        return wavlm_model(**dict(TINY, **override)), False
    bundle = getattr(torchaudio.pipelines, BUNDLES[name])
    build = wavlm_model if bundle._model_type == "WavLM" else wav2vec2_model
    return build(**dict(bundle._params, **override)), bundle._normalize_waveform


def load_backbone(name, weights=None, seed=0, dropout=None):
    """A plain torchaudio Wav2Vec2Model with the bundle's pretrained weights (or `weights`: a path or
    a state dict), and whether the bundle layer-normalises its input wave."""
    torch.manual_seed(seed)
    model, normalize = build_backbone(name, dropout)
    if name != "tiny" and weights is None:
        bundle, cache = getattr(torchaudio.pipelines, BUNDLES[name]), os.path.join(torch.hub.get_dir(), "checkpoints")
        try:
            weights = bundle._get_state_dict(None)  # from the cache, or downloaded into it once
        except Exception as e:
            raise ValueError(f"cannot get the {name} weights: {bundle._path} is not in {cache} and the download "
                             f"failed ({type(e).__name__}); fetch it elsewhere and pass --weights PATH") from None
    if weights is not None:
        state = load_checkpoint(weights) if isinstance(weights, str) else weights
        try:
            model.load_state_dict(state)
        except (RuntimeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0 if len(str(e).splitlines()) < 2 else 1].strip()
            raise ValueError(f"{weights if isinstance(weights, str) else name}: the weights do not fit the {name} "
                             f"architecture ({first})") from None
    return model.eval(), normalize


def pretrain_tiny(root, audio, epochs=4, seed=0, chunk=4.0, batch_size=16, max_steps=300):
    """tiny's stand-in for self-supervised pretraining: `epochs` passes over `audio` ({story: 16 kHz
    wave}) in `chunk`-second pieces, learning to name each 40 ms frame's phone (the story's TextGrid
    phone tier under root, pauses a class of their own) from the top layer. Like a real speech model,
    it then knows the sounds of the language but not what its words mean. Each batch is sliced from
    the (memory-mapped) waves when it is used, and training stops after max_steps steps, so that on
    a whole subject (16 h of audio) it stays a smoke test of a minute or so. Returns (state dict,
    frame accuracy of the last epoch)."""
    torch.manual_seed(seed)
    model, _ = build_backbone("tiny")
    hop = math.prod(stride for _, _, stride in TINY["extractor_conv_layer_config"])  # samples per frame
    phones = {s: data.words_and_phones(data.textgrid_path(root, s))[0] for s in audio}
    names = ["pause"] + sorted({p for s in audio for _, _, p in phones[s]})
    n = round(chunk * data.SR)
    frames = {}  # story -> (frames,) phone index, 0 = pause
    for s in audio:
        frames[s] = torch.zeros(len(audio[s]) // hop + 1, dtype=torch.long)
        for a, b, p in phones[s]:
            frames[s][round(a * data.SR / hop):round(b * data.SR / hop)] = names.index(p)
    pieces = [(s, start) for s in audio for start in range(0, len(audio[s]) - n + 1, n)]
    if not pieces:
        raise ValueError(f"pretraining tiny needs stories of at least {chunk:g} s; pass --tiny-pretrain 0")
    readout = nn.Linear(TINY["encoder_embed_dim"], len(names))
    opt = torch.optim.AdamW([*model.parameters(), *readout.parameters()], lr=1e-3)
    model.train()
    step, accuracy = 0, float("nan")
    for epoch in range(epochs):
        right = total = 0
        for idx in data.progress(torch.randperm(len(pieces)).split(batch_size), f"tiny pretraining, epoch {epoch + 1}"):
            wave = torch.stack([torch.from_numpy(np.array(audio[s][a:a + n])) for s, a in map(pieces.__getitem__, idx)])
            labels = torch.stack([frames[s][a // hop:(a + n) // hop] for s, a in map(pieces.__getitem__, idx)])
            h = hidden(model, wave, TINY["encoder_num_layers"])  # (batch, frames, dim)
            f = min(h.shape[1], labels.shape[1])
            logits, y = readout(h[:, :f]), labels[:, :f]
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            right, total, step = right + (logits.argmax(-1) == y).sum().item(), total + y.numel(), step + 1
            if step == max_steps:
                break
        accuracy = right / total
        if step == max_steps:
            break
    return model.state_dict(), accuracy


def hidden(backbone, wave, layer, layer_weights=None, normalize=False):
    """(batch, samples) -> (batch, frames, dim): transformer layer `layer` (1-based; layers above it
    are not computed), or the softmax-weighted sum of all layers (Li et al.)."""
    if normalize:
        wave = F.layer_norm(wave, wave.shape[-1:])
    if layer_weights is None:
        return backbone.extract_features(wave, num_layers=layer)[0][-1]
    layers = torch.stack(backbone.extract_features(wave)[0])  # (layers, batch, frames, dim)
    return torch.einsum("l,lbfd->bfd", layer_weights.softmax(0), layers)


def pooled(backbone, wave, layer, history, layer_weights=None, normalize=False):
    """(batch, samples) -> (batch, history * dim): frames averaged in TR bins, bin k = the audio
    heard k..k+1 TRs before the fMRI frame."""
    return data.pool_frames(hidden(backbone, wave, layer, layer_weights, normalize), history).flatten(1)


def frame_hop(backbone):
    """Samples per output frame: the product of the CNN front end's strides (320 for the bundles,
    640 for tiny)."""
    return math.prod(block.conv.stride[0] for block in backbone.feature_extractor.conv_layers)


def feature_key(name, backbone, layer, layer_weights, normalize):
    """What pooled() computes, for the feature cache: the architecture and the backbone's weights
    (adapters included), the layer read, the wave's normalisation."""
    return dict(arch=TINY if name == "tiny" else BUNDLES[name], backbone=data.digest(backbone.state_dict()), layer=layer,
                layer_weights=layer_weights, normalize=normalize, torch=torch.__version__)


class BrainModel(nn.Module):
    """wave -> backbone -> TR bins -> z-score (training statistics) -> a head per subject -> voxels."""

    def __init__(self, backbone, heads, mu, sd, layer, history, n_layers=0, normalize=False):
        super().__init__()
        self.backbone, self.layer, self.history, self.normalize = backbone, layer, history, normalize
        self.heads = nn.ModuleList(heads)
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)
        self.layer_weights = nn.Parameter(torch.zeros(n_layers)) if n_layers else None  # uniform at start

    def features(self, wave):  # (batch, samples) -> (batch, history * dim)
        x = pooled(self.backbone, wave, self.layer, self.history, self.layer_weights, self.normalize)
        return (x - self.mu) / self.sd

    def forward(self, wave):  # (batch, samples) -> [(batch, voxels of subject k)]: one forward, every head
        x = self.features(wave)
        return [head(x) for head in self.heads]


def make_head(W, bottleneck=0):
    """Linear(p -> v) holding the ridge weights W (p, v); with a bottleneck K, two Linears through K
    units holding the best rank-K approximation of W (Eckart-Young), split evenly by sqrt(s)."""
    p, v = W.shape
    if not bottleneck:
        head = nn.Linear(p, v)
        head.weight.data, head.bias.data = W.T.contiguous(), torch.zeros(v)
        return head
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(bottleneck, len(s))
    down, up = nn.Linear(p, k, bias=False), nn.Linear(k, v)
    down.weight.data = (U[:, :k] * s[:k].sqrt()).T.contiguous()
    up.weight.data, up.bias.data = (Vh[:k].T * s[:k].sqrt()).contiguous(), torch.zeros(v)
    return nn.Sequential(down, up)
