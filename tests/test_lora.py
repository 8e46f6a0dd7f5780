import copy

import pytest
import torch
from torchaudio.models import wav2vec2_model, wavlm_model

import lora
from model import TINY

W2V = {k: v for k, v in TINY.items() if k not in ("encoder_num_buckets", "encoder_max_distance")}
FAMILIES = {  # small random models of each family, built by the functions the real bundles use
    "wav2vec2": lambda: wav2vec2_model(**dict(W2V, extractor_mode="layer_norm",
                                              encoder_layer_norm_first=True)),
    "hubert": lambda: wav2vec2_model(**W2V),  # HuBERT base: group-norm extractor, post-norm layers
    "wavlm": lambda: wavlm_model(**TINY),
}


def model(family, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def feats(m, x):
    with torch.no_grad():
        return m.extract_features(x)[0][-1]


def randomise_B(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)


x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_then_merge_equals_adapted(family):
    m = model(family)
    base = feats(m, x)
    lora.add_lora(m, rank=4, alpha=8)
    assert torch.equal(feats(m, x), base)
    randomise_B(m)
    adapted = feats(m, x)
    assert (adapted - base).abs().max() > 1e-3
    lora.merge_lora(m)
    torch.testing.assert_close(feats(m, x), adapted, rtol=1e-5, atol=1e-5)
    fresh = model(family, seed=1)
    fresh.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(feats(fresh, x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_and_gradients_reach_every_adapter(family):
    m = model(family)
    names = lora.add_lora(m, rank=3, alpha=6, targets="qkvo", layers=[0, 2])
    assert len(names) == 8
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    dim = TINY["encoder_embed_dim"]
    assert sum(p.numel() for p in trainable.values()) == 8 * 3 * (dim + dim)
    randomise_B(m)  # with B = 0 the gradient of A is zero by construction
    m.train()
    m.extract_features(x)[0][-1].square().sum().backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"


def test_fused_wavlm_qkv_is_not_bypassed():
    m = model("wavlm")
    lora.add_lora(m, rank=2, alpha=2, targets="v", layers=[1])
    randomise_B(m)
    base = model("wavlm")
    assert (feats(m, x) - feats(base, x)).abs().max() > 1e-3  # a v-only adapter changes the output
    d = lora.delta_norms(m)
    assert list(d) == ["encoder.transformer.layers.1.attention.v"]
    assert d["encoder.transformer.layers.1.attention.v"] > 0


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_dropout_in_train_mode_only(family):
    m = model(family)
    lora.add_lora(m, rank=4, alpha=8, dropout=0.5)
    randomise_B(m)
    m.eval()
    assert torch.equal(feats(m, x), feats(m, x))
    m.train()
    assert not torch.equal(feats(m, x), feats(m, x))


def test_full_finetuning_keeps_cnn_frozen():
    m = model("hubert")
    names = lora.add_lora(m, rank=0)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and set(names) == set(trainable)
    assert all(n.startswith("encoder.transformer.") for n in trainable)


def test_state_dict_round_trip_and_wrong_key():
    a, b = model("wavlm"), model("wavlm", seed=5)
    lora.add_lora(a, rank=4, alpha=4)
    lora.add_lora(b, rank=4, alpha=4)
    randomise_B(a)
    state = lora.lora_state_dict(a)
    assert state and all(".lora_" in k for k in state)
    b.load_state_dict(a.state_dict())  # same base too, so outputs can be compared
    lora.load_lora(b, state)
    assert torch.equal(feats(a, x), feats(b, x))
    bad = dict(state)
    bad["encoder.transformer.layers.0.attention.nope.lora_A"] = bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing .*unexpected .*nope"):
        lora.load_lora(b, bad)


def test_numerics_match_the_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    ad = lora.LoRALinear(copy.deepcopy(lin), rank=2, alpha=3.0, dropout=0.0)
    torch.nn.init.normal_(ad.lora_B)
    v = torch.randn(4, 6)
    want = lin(v) + (3.0 / 2) * v @ ad.lora_A.T @ ad.lora_B.T
    torch.testing.assert_close(ad(v), want)
    assert ad.lora_A.shape == (2, 6) and ad.lora_B.shape == (5, 2)
    bound = 1 / 6 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 6
    assert ad.lora_A.abs().max() <= bound


def test_peft_agrees_when_installed():
    peft = pytest.importorskip("peft")  # an extra oracle; the tests above stand on their own
    m = model("wav2vec2")
    ours = copy.deepcopy(m)
    lora.add_lora(ours, rank=4, alpha=8, targets="qkvo")
    randomise_B(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                             "out_proj"])
    theirs = peft.inject_adapter_in_model(cfg, m)
    mine = lora.lora_state_dict(ours)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                key = n.replace(".lora_A.default.weight",
                                ".lora_A").replace(".lora_B.default.weight", ".lora_B")
                p.copy_(mine[key])
    torch.testing.assert_close(feats(theirs, x), feats(ours, x), rtol=1e-5, atol=1e-5)
