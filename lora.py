"""
Low-rank adapters (LoRA, Hu et al. 2021) for torchaudio's wav2vec2, HuBERT and WavLM models.

y = W x + b + (alpha / r) * B A dropout(x), with A (r, in) kaiming-uniform and B (out, r) zero,
so the adapted model equals the pretrained one at step 0 (the loralib and PEFT conventions).

wav2vec2 and HuBERT call q_proj, k_proj, v_proj and out_proj as nn.Linear modules: we wrap them.
WavLM computes q, k and v with one F.linear on the fused attention.in_proj_weight (3*dim, dim),
so no module call exists to wrap; its q, k and v row blocks get their adapters through a weight
parametrization instead (the way PEFT adapts nn.MultiheadAttention, by merging in the forward).
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


def _init_adapter(rank, n_in, n_out, like):
    """A (rank, n_in) and B (n_out, rank), made on the device and in the dtype of the weight they
    adapt (`like`): a backbone already on a GPU gets its adapters there."""
    A = nn.Parameter(torch.empty(rank, n_in, device=like.device, dtype=like.dtype))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, nn.Parameter(torch.zeros(n_out, rank, device=like.device, dtype=like.dtype))


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update; the base layer stays frozen."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scaling, self.dropout = base, alpha / rank, nn.Dropout(dropout)
        self.lora_A, self.lora_B = _init_adapter(rank, base.in_features, base.out_features,
                                                 base.weight)

    def delta(self):
        return self.scaling * self.lora_B @ self.lora_A  # (out, in)

    def forward(self, x):  # (batch, frames, in) -> (batch, frames, out)
        down = F.linear(self.dropout(x), self.lora_A)  # (batch, frames, rank)
        return self.base(x) + self.scaling * F.linear(down, self.lora_B)


class FusedQKVLoRA(nn.Module):
    """Parametrization of WavLM's fused (3*dim, dim) in_proj_weight: one adapter per chosen block.

    The weight path never sees the tokens, so dropout here drops input features with one mask per
    forward pass (shared by every frame) rather than one mask per frame as LoRALinear does.
    """

    def __init__(self, weight, blocks, rank, alpha, dropout):
        super().__init__()
        dim = weight.shape[1]  # weight: the fused (3*dim, dim) in_proj_weight
        self.dim, self.blocks, self.scaling, self.p = dim, blocks, alpha / rank, dropout
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for b in blocks:
            self.lora_A[b], self.lora_B[b] = _init_adapter(rank, dim, dim, weight)

    def delta(self, block):
        return self.scaling * self.lora_B[block] @ self.lora_A[block]  # (dim, dim)

    def forward(self, W):  # (3*dim, dim) -> (3*dim, dim)
        rows = []
        for b in "qkv":
            if b not in self.blocks:
                rows.append(W.new_zeros(self.dim, self.dim))
                continue
            A = self.lora_A[b]
            if self.training and self.p > 0:
                A = A * F.dropout(torch.ones_like(A[:1]), self.p)
            rows.append(self.scaling * self.lora_B[b] @ A)
        return W + torch.cat(rows)


def _layers(model):
    return model.encoder.transformer.layers


def add_lora(model, rank=8, alpha=16.0, dropout=0.0, targets="qkvo", layers=None):
    """Freeze the model and adapt projections `targets` (letters of "qkvo", o = output projection)
    in transformer layers `layers` (0-based; default all). rank=0 instead unfreezes the whole
    transformer (full fine-tuning). The CNN feature extractor stays frozen in every mode.
    Returns the names of the adapted weights (every trainable parameter when rank=0)."""
    assert targets and set(targets) <= set("qkvo"), f"targets: letters of 'qkvo', not {targets!r}"
    model.requires_grad_(False)
    if rank == 0:
        model.encoder.transformer.requires_grad_(True)
        return [f"encoder.transformer.{n}" for n, _ in model.encoder.transformer.named_parameters()]
    names = []
    for i in range(len(_layers(model))) if layers is None else layers:
        attn = _layers(model)[i].attention
        mha = getattr(attn, "attention", None)  # WavLM only: an nn.MultiheadAttention
        qkv = "".join(t for t in "qkv" if t in targets)
        if mha is not None and qkv:
            parametrize.register_parametrization(
                mha, "in_proj_weight", FusedQKVLoRA(mha.in_proj_weight, qkv, rank, alpha, dropout))
        for t in targets:
            if mha is None or t == "o":
                owner, name = (mha if mha is not None else attn), _PROJ[t]
                setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha, dropout))
            names.append(f"encoder.transformer.layers.{i}.attention.{t}")
    return sorted(names, key=_order)


_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def _order(name):  # layer number, then q, k, v, o
    return int(name.split(".")[3]), "qkvo".index(name[-1])


def _adapters(model):
    """Yield (name, base weight (out, in), owner, attribute) for every adapted weight."""
    for i, layer in enumerate(_layers(model)):
        attn, prefix = layer.attention, f"encoder.transformer.layers.{i}.attention"
        mha = getattr(attn, "attention", None)
        if mha is not None and parametrize.is_parametrized(mha, "in_proj_weight"):
            p = mha.parametrizations.in_proj_weight
            for b in p[0].blocks:
                j = "qkv".index(b) * mha.embed_dim
                yield f"{prefix}.{b}", p.original[j:j + mha.embed_dim], p[0], b
        owner = mha if mha is not None else attn
        for t, name in _PROJ.items():
            if isinstance(getattr(owner, name, None), LoRALinear):
                yield f"{prefix}.{t}", getattr(owner, name).base.weight, owner, name


def _delta(owner, attr):
    return owner.delta(attr) if isinstance(owner, FusedQKVLoRA) else getattr(owner, attr).delta()


def lora_state_dict(model):
    """Only the adapter tensors: small enough to share."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora(model, state):
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def delta_norms(model):
    """||scaling * B A|| / ||W|| per adapted weight: how far tuning moved it (Li et al., fig. 2)."""
    return {name: (_delta(owner, attr).norm() / W.norm()).item()
            for name, W, owner, attr in _adapters(model)}


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and remove it: the model is a plain torchaudio
    model again, whose state_dict loads strictly into a fresh one of the same configuration."""
    for layer in _layers(model):
        attn = layer.attention
        mha = getattr(attn, "attention", None)
        if mha is not None and parametrize.is_parametrized(mha, "in_proj_weight"):
            mha.parametrizations.in_proj_weight.eval()  # no dropout mask in the merged weight
            parametrize.remove_parametrizations(mha, "in_proj_weight", leave_parametrized=True)
        owner = mha if mha is not None else attn
        for name in _PROJ.values():
            m = getattr(owner, name, None)
            if isinstance(m, LoRALinear):
                m.base.weight += m.delta()
                setattr(owner, name, m.base)
    return model


def merged_copy(backbone):
    """lora.merge_lora of a copy of `backbone`, the backbone itself untouched. The copy's
    parametrized modules get classes of their own first: remove_parametrizations deletes the
    property from the module's class, which a plain deepcopy shares with the original, so merging
    a plain deepcopy of a LoRA WavLM leaves the original without its in_proj_weight."""
    out = copy.deepcopy(backbone)
    for module in out.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return merge_lora(out)
