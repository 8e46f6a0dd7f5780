"""
The model: a torchaudio speech backbone (wav2vec2, HuBERT or WavLM) read at one transformer layer
(an Extractor), its frames averaged into the TR bins of each fMRI frame's window, and a linear head
per subject from those features to voxels. Modules only, as whisper's model.py: the backbones (and
`tiny`, with its cached phone pretraining), LoRA adapters on them (add_adapters), and BrainModel
with its heads. What the ridge reads of them is features.py's.

    extractor = load_extractor("wavlm_base_plus", "9")        # torchaudio's pretrained weights
    model = BrainModel(extractor, [make_head(W)], mu, sd, history=4)
    voxels = model(wave)[0]                  # (batch, samples) at 16 kHz -> (batch, voxels)
"""
import contextlib
import ctypes
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from torchaudio.models import wav2vec2_model, wavlm_model

import data
import lora
import textgrid
from cache import cached, digest, file_key, log, progress

BUNDLES = {"wav2vec2_base": "WAV2VEC2_BASE", "wav2vec2_large": "WAV2VEC2_LARGE",
           "hubert_base": "HUBERT_BASE", "hubert_large": "HUBERT_LARGE", "wavlm_base": "WAVLM_BASE",
           "wavlm_base_plus": "WAVLM_BASE_PLUS", "wavlm_large": "WAVLM_LARGE"}
# a small WavLM: the real classes, but 40 ms frames (stride 640, not 320) for a fast laptop demo
TINY = dict(
    extractor_mode="group_norm",
    extractor_conv_layer_config=[(32, 40, 20), (32, 4, 4), (32, 2, 2), (32, 2, 2), (32, 2, 2)],
    extractor_conv_bias=False, encoder_embed_dim=64, encoder_projection_dropout=0.0,
    encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=4,
    encoder_num_heads=4,
    encoder_num_buckets=32, encoder_max_distance=128, encoder_attention_dropout=0.0,
    encoder_ff_interm_features=128, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
    encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)


# -----------------------------------------------------------------------------
# the backbone

def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") \
            from None


DROPOUTS = ("encoder_projection_dropout", "encoder_attention_dropout", "encoder_dropout",
            "encoder_ff_interm_dropout")


def build_backbone(name, dropout=None):
    """The architecture of `name` with random weights. dropout replaces the bundle's own dropout
    probabilities (active in training mode only); LayerDrop is always off, so that every layer the
    head reads is computed."""
    if name != "tiny" and name not in BUNDLES:
        raise ValueError(f"unknown model {name!r}; choose tiny or one of {', '.join(BUNDLES)}")
    override = dict(encoder_layer_drop=0.0)
    if dropout is not None:
        override.update({k: dropout for k in DROPOUTS})
    if name == "tiny":
        return wavlm_model(**dict(TINY, **override))
    bundle = getattr(torchaudio.pipelines, BUNDLES[name])
    build = wavlm_model if bundle._model_type == "WavLM" else wav2vec2_model
    return build(**dict(bundle._params, **override))


def normalizes(name):
    """Whether model `name`'s bundle layer-normalises the wave before the backbone."""
    return name != "tiny" and getattr(torchaudio.pipelines, BUNDLES[name])._normalize_waveform


def keep_freed_memory():
    """glibc gives each large freed tensor back to the OS, so every training step page-faults its
    activations in anew; on CPU, keep freed memory for reuse instead (bench.py: a wavlm_base step
    about 15% faster). Linux/glibc only; elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: the heap's free top is not given back


def load_backbone(name, weights=None, seed=0, dropout=None):
    """A plain torchaudio Wav2Vec2Model with the bundle's pretrained weights (or `weights`: a path
    or a state dict), in eval mode."""
    torch.manual_seed(seed)
    model = build_backbone(name, dropout)
    if name != "tiny" and weights is None:
        bundle = getattr(torchaudio.pipelines, BUNDLES[name])
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        try:
            weights = bundle._get_state_dict(None)  # from the cache, or downloaded into it once
        except Exception as e:
            raise ValueError(f"cannot get the {name} weights: {bundle._path} is not in {cache} and "
                             f"the download failed ({type(e).__name__}); fetch it elsewhere "
                             "and pass --weights PATH") from None
    if weights is not None:
        state = load_checkpoint(weights) if isinstance(weights, str) else weights
        try:
            model.load_state_dict(state)
        except (RuntimeError, AttributeError) as e:
            lines = str(e).strip().splitlines()
            first = lines[0 if len(lines) < 2 else 1].strip()
            what = weights if isinstance(weights, str) else name
            raise ValueError(f"{what}: the weights do not fit the {name} architecture ({first})") \
                from None
    return model.eval()


POOLS = ("bins", "mean")  # --pool: a window's frames in TR bins, or their mean (Moussa et al.)


@dataclass(frozen=True)
class Augment:
    """What a Hugging Face speech model in training mode does beside its dropout, and torchaudio's
    does not: SpecAugment's time masks on the projected features, and LayerDrop (hidden)."""
    mask_prob: float = 0.0  # --mask-time-prob: 0 masks nothing
    mask_length: int = 10  # --mask-time-length: frames per span
    min_masks: int = 2  # --mask-time-min-masks: spans at least, per window
    layer_drop: float = 0.0  # --layer-drop: each layer skipped with this probability

    @property
    def acts(self):
        return self.mask_prob > 0 or self.layer_drop > 0


class Extractor(nn.Module):
    """What turns audio into the features the ridge and the heads read: a backbone read at one
    transformer layer (layers above it are not computed), or at a learned softmax-weighted sum of
    all of them (Li et al.), the wave layer-normalised first where its bundle does so; a window's
    frames pooled by `pool` (--pool): bins, the mean of each TR bin; mean, of all of them."""

    def __init__(self, name, backbone, layer, normalize=False, weighted=False, *, pool="bins",
                 augment=Augment()):
        super().__init__()
        assert pool in POOLS, pool
        self.name, self.backbone, self.layer, self.normalize = name, backbone, layer, normalize
        self.pool, self.augment = pool, augment  # augment: in training mode only
        n_layers = len(backbone.encoder.transformer.layers)
        # (layers,) logits, uniform at the start
        where = next(backbone.parameters()).device  # made on the backbone's device
        self.layer_weights = nn.Parameter(torch.zeros(n_layers, device=where)) if weighted else None

    def hidden(self, wave):  # (batch, samples) -> (batch, frames, dim)
        return hidden(self.backbone, wave, self.layer, self.layer_weights, self.normalize,
                      augment=self.augment)

    def pooled(self, wave, history):  # (batch, samples) -> (batch, history * dim); mean: dim
        if self.pool == "mean":  # the whole window's frames (Moussa et al.'s hubert_linear.py)
            return self.hidden(wave).mean(1)
        return pool_frames(self.hidden(wave), history).flatten(1)

    @property
    def hop(self):
        """Samples per output frame (frame_hop)."""
        return frame_hop(self.backbone)

    def key(self):
        """What the features depend on, for the feature cache (feature_key)."""
        return feature_key(self.name, self.backbone, self.layer, self.layer_weights, self.normalize,
                           pool=self.pool)


def load_extractor(name, layer=None, weights=None, seed=0, dropout=None, *, pool="bins",
                   augment=Augment()):
    """An Extractor of backbone `name` (load_backbone) read at --layer `layer`: a 1-based layer
    number as text, None for 3/4 of the depth, or 'weighted'; its windows pooled by `pool`; in
    training mode, `augment` (an Augment) acts too."""
    backbone = load_backbone(name, weights, seed, dropout)
    depth = len(backbone.encoder.transformer.layers)
    return Extractor(name, backbone, layer_of(layer, depth), normalizes(name), layer == "weighted",
                     pool=pool, augment=augment)


PRETRAIN_CHUNK = 2.0  # seconds of audio in each piece of tiny's pretraining


def pretrain_tiny(root, audio, epochs=4, seed=0, *, chunk=PRETRAIN_CHUNK, batch_size=16,
                  max_steps=300):
    """tiny's stand-in for self-supervised pretraining: `epochs` passes over `audio` ({story: 16 kHz
    wave}) in `chunk`-second pieces, learning to name each 40 ms frame's phone (the story's TextGrid
    phone tier under root, pauses a class of their own) from the top layer. Like a real speech
    model, it then knows the sounds of the language but not what its words mean. Each batch is
    sliced from the (memory-mapped) waves when it is used, and training stops after max_steps steps,
    so that on a whole subject (16 h of audio) it stays a smoke test of a minute or so. Returns
    (state dict, frame accuracy of the last epoch)."""
    torch.manual_seed(seed)
    model = build_backbone("tiny")
    hop = frame_hop(model)  # samples per frame
    phones = {s: textgrid.read_phones(data.textgrid_path(root, s)) for s in audio}
    names = ["pause"] + sorted({p for s in audio for _, _, p in phones[s]})
    n = round(chunk * data.SR)
    frames = {}  # story -> (frames,) phone index, 0 = pause
    for s in audio:
        frames[s] = torch.zeros(len(audio[s]) // hop + 1, dtype=torch.long)
        for a, b, p in phones[s]:
            frames[s][round(a * data.SR / hop):round(b * data.SR / hop)] = names.index(p)
    pieces = [(s, start) for s in audio for start in range(0, len(audio[s]) - n + 1, n)]
    if not pieces:
        raise ValueError(f"pretraining tiny needs stories of at least {chunk:g} s; pass "
                         "--tiny-pretrain 0")
    readout = nn.Linear(TINY["encoder_embed_dim"], len(names))
    opt = torch.optim.AdamW([*model.parameters(), *readout.parameters()], lr=1e-3)
    model.train()
    step, accuracy = 0, float("nan")
    for epoch in range(epochs):
        right = total = 0
        batches = torch.randperm(len(pieces)).split(batch_size)
        for idx in progress(batches, f"tiny pretraining, epoch {epoch + 1}"):
            chosen = [pieces[i] for i in idx]
            wave = torch.stack([torch.from_numpy(np.array(audio[s][a:a + n])) for s, a in chosen])
            labels = torch.stack([frames[s][a // hop:(a + n) // hop] for s, a in chosen])
            h = hidden(model, wave, TINY["encoder_num_layers"])  # (batch, frames, dim)
            f = min(h.shape[1], labels.shape[1])
            logits, y = readout(h[:, :f]), labels[:, :f]
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            right += (logits.argmax(-1) == y).sum().item()
            total, step = total + y.numel(), step + 1
            if step == max_steps:
                break
        accuracy = right / total
        if step == max_steps:
            break
    return model.state_dict(), accuracy


def tiny_weights(root, windows, epochs, seed, max_steps=300):
    """tiny's phone-pretrained state dict for the training stories of `windows` (pretrain_tiny),
    cached under their audio and TextGrids, the epochs, the seed, the chunk and tiny's shape."""
    grids = [data.textgrid_path(root, s) for s in windows.stories]

    def build():
        audio = dict(zip(windows.stories, windows.waves))
        state, accuracy = pretrain_tiny(root, audio, epochs, seed, max_steps=max_steps)
        return {"state": state, "accuracy": accuracy}
    t0 = time.time()
    key = dict(audio=windows.keys, textgrids=[file_key(p) for p in grids], epochs=epochs,
               seed=seed, max_steps=max_steps, chunk=PRETRAIN_CHUNK, tiny=TINY,
               torch=torch.__version__)
    e = cached("tiny", key, build, "tiny")
    log(f"tiny pretrained to name phones: {epochs} epochs, frame accuracy {e['accuracy']:.2f}, "
        f"{time.time() - t0:.0f} s")
    return e["state"]


def pool_frames(frames, history):
    """(batch, n_frames, dim) -> (batch, history, dim): the mean of the frames in each TR-long bin.
    The window runs forward in time and ends at t_r, so its last bin is the audio heard 0..1 TR
    before t_r; we flip, so that out[:, k] is the audio heard k..k+1 TRs before t_r (delay k)."""
    B, n, D = frames.shape
    assert n >= history, f"{n} frames cannot fill {history} bins"
    edges = torch.linspace(0, n, history + 1, device=frames.device).round().long()
    c = F.pad(frames.cumsum(1), (0, 0, 1, 0))  # (batch, n_frames + 1, dim)
    sums = c[:, edges[1:]] - c[:, edges[:-1]]  # (batch, history, dim)
    return (sums / (edges[1:] - edges[:-1]).to(frames.dtype)[None, :, None]).flip(1)


def hidden(backbone, wave, layer, layer_weights=None, normalize=False, *, augment=Augment()):
    """(batch, samples) -> (batch, frames, dim): transformer layer `layer` (1-based; layers above it
    are not computed), or the softmax-weighted sum of all layers (Li et al.); a backbone in
    training mode applies `augment` (augmented_layers)."""
    if normalize:
        wave = F.layer_norm(wave, wave.shape[-1:])
    top = layer if layer_weights is None else None
    if backbone.training and augment.acts:
        layers = augmented_layers(backbone, wave, top, augment)
    else:
        layers = backbone.extract_features(wave, num_layers=top)[0]
    if layer_weights is None:
        return layers[-1]
    return torch.einsum("l,lbfd->bfd", layer_weights.softmax(0), torch.stack(layers))


def augmented_layers(backbone, wave, num_layers, augment):
    """torchaudio's extract_features (every layer's (batch, frames, dim), up to num_layers) with a
    Hugging Face model's training-mode SpecAugment and LayerDrop: time spans of the projected
    features (after the CNN and the feature projection, before the positional convolution) set to
    zero (time_mask; HF writes its pretrained mask embedding there, which torchaudio's weights do
    not hold), and each layer skipped with probability augment.layer_drop, its input passed on as
    its output, except a layer that computes WavLM's position bias (HF never skips WavLM's
    first)."""
    x, _ = backbone.feature_extractor(wave, None)  # (batch, frames, 512)
    x = backbone.encoder.feature_projection(x)  # (batch, frames, dim)
    if augment.mask_prob > 0:
        masked = time_mask(x.shape[0], x.shape[1], augment).to(x.device)  # (batch, frames)
        x = x.masked_fill(masked[..., None], 0.0)
    transformer = backbone.encoder.transformer
    x, bias, out = transformer._preprocess(x), None, []
    for layer in transformer.layers[:num_layers]:
        keeps_bias = getattr(layer.attention, "rel_attn_embed", None) is not None
        if keeps_bias or not torch.rand(()) < augment.layer_drop:
            x, bias = layer(x, None, position_bias=bias)
        out.append(x)
    return out


def time_mask(batch, frames, augment):
    """(batch, frames) bool: SpecAugment's time mask as Hugging Face draws it for sequences of
    equal length (transformers' _compute_mask_indices): n = max(int(p * frames / length + u),
    min_masks) spans, u ~ U(0, 1) drawn once per call, at most frames // length and frames -
    length + 1; each row's span starts drawn without replacement from 0..frames - length, each
    span `length` frames (spans may overlap, so fewer than n * length frames may be masked)."""
    p, length = augment.mask_prob, augment.mask_length
    assert 1 <= length <= frames, f"a mask span of {length} frames in {frames}"
    n = max(int(p * frames / length + torch.rand(()).item()), augment.min_masks)
    n = min(n, frames // length, frames - length + 1)
    starts = torch.rand(batch, frames - length + 1).argsort(1)[:, :n]  # (batch, n) distinct
    spans = (starts[:, :, None] + torch.arange(length)).flatten(1)  # (batch, n * length)
    return torch.zeros(batch, frames, dtype=torch.bool).scatter_(1, spans, True)


def window_frames(arch, samples):
    """The frames the CNN front end of architecture `arch` (a torchaudio builder's settings)
    makes of `samples` samples: each convolution (kernel k, stride s) maps n to (n - k) // s + 1."""
    for _, k, s in arch["extractor_conv_layer_config"]:
        samples = (samples - k) // s + 1
    return samples


def add_adapters(backbone, layer, rank, alpha, dropout, targets, *, weighted=False,
                 projection=False):
    """The backbone made tunable up to the layer read: LoRA on the attention projections of layers
    1..layer (lora.add_lora), or with rank 0 the whole transformer, frozen above that layer unless
    every layer is read (weighted), as those get no gradient; with projection, the feature
    projection too (LayerNorm and Linear from the CNN to the transformer: only the CNN frozen, as
    Moussa et al.'s _freeze_parameters() leaves it). In place; returns the backbone."""
    lora.add_lora(backbone, rank, alpha, dropout, targets, range(layer))
    if rank == 0 and not weighted:
        backbone.encoder.transformer.layers[layer:].requires_grad_(False)
    if projection:
        backbone.encoder.feature_projection.requires_grad_(True)
    return backbone


def layer_of(layer, n_layers):
    """The transformer layer read (1-based) for --layer: a number, None for 3/4 of the depth, or all
    of them if 'weighted'."""
    return n_layers if layer == "weighted" else int(layer or round(0.75 * n_layers))


def frame_hop(backbone):
    """Samples per output frame: the product of the CNN front end's strides (320 for the bundles,
    640 for tiny)."""
    return math.prod(block.conv.stride[0] for block in backbone.feature_extractor.conv_layers)


def feature_key(name, backbone, layer, layer_weights, normalize, *, pool="bins"):
    """What pooled() computes, for the feature cache: the architecture and the backbone's weights
    (adapters included), the layer read, the wave's normalisation, the pooling."""
    arch = TINY if name == "tiny" else BUNDLES[name]
    return dict(arch=arch, backbone=digest(backbone.state_dict()), layer=layer,
                layer_weights=layer_weights, normalize=normalize, pool=pool,
                torch=torch.__version__)


# -----------------------------------------------------------------------------
# the model trained in stage 2

class BrainModel(nn.Module):
    """wave -> extractor -> TR bins (or the mean of the frames: pool) -> z-score (training
    statistics; or with raw, the features as they are) -> a head per subject -> voxels."""

    def __init__(self, extractor, heads, mu, sd, history, *, raw=False):
        super().__init__()
        self.extractor, self.history, self.raw = extractor, history, raw
        self.heads = nn.ModuleList(heads)
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)
        for head in self.heads if raw else ():  # the same function as on z-scored features
            fold_zscore(head, mu, sd)

    @property
    def pool(self):
        """How the window's frames are pooled (--pool): the extractor's, bins or mean."""
        return self.extractor.pool

    def features(self, wave):  # (batch, samples) -> (batch, p): history * dim, or dim (mean)
        return self.head_input(self.extractor.pooled(wave, self.history))

    def head_input(self, x):  # (batch, p) pooled features -> what the heads read, on x's device
        return x if self.raw else (x - self.mu.to(x.device)) / self.sd.to(x.device)

    def forward(self, wave):  # (batch, samples) -> [(batch, voxels of subject k)]: every head
        x = self.features(wave)  # the backbone under the caller's autocast (bf16 on a GPU)
        # the heads in float32, as they are scored (autocast runs only on a GPU here)
        with torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext():
            return [head(x.float()) for head in self.heads]


def make_head(W, bottleneck=0):
    """Linear(p -> v) holding the ridge weights W (p, v); with a bottleneck K, two Linears through K
    units holding the best rank-K approximation of W (Eckart-Young), split evenly by sqrt(s)."""
    (p, v), like = W.shape, dict(device=W.device, dtype=W.dtype)  # made where W is
    if not bottleneck:
        head = nn.Linear(p, v, **like)
        head.weight.data, head.bias.data = W.T.contiguous(), torch.zeros(v, **like)
        return head
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(bottleneck, len(s))
    down, up = nn.Linear(p, k, bias=False, **like), nn.Linear(k, v, **like)
    down.weight.data = (U[:, :k] * s[:k].sqrt()).T.contiguous()
    up.weight.data, up.bias.data = (Vh[:k].T * s[:k].sqrt()).contiguous(), torch.zeros(v, **like)
    return nn.Sequential(down, up)


@torch.no_grad()
def fold_zscore(head, mu, sd):
    """A head (make_head's) that reads z = (x - mu) / sd changed in place to read x itself, the
    same function (--head-input raw): its first Linear's weight divided by sd, and -W mu / sd
    carried through to the last Linear's bias. Gradients then reach the backbone through raw
    features, as in Moussa et al.'s nn.Linear on the mean of the frames."""
    first, last = (head[0], head[-1]) if isinstance(head, nn.Sequential) else (head, head)
    first.weight /= sd  # (k or v, p)
    shift = first.weight @ mu  # (k or v,)
    last.bias -= shift if first is last else last.weight @ shift
