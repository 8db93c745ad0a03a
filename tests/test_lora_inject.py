"""``lora.inject`` on a small transformer-like model: which modules get replaced, what they keep, the
matching rules (all-linear, regex, suffix list, exclude, slices) and the no-match error text.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit import lora

V, D, KV, FF, N_LAYERS = 32, 16, 4, 24, 3


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(D, D + 2 * KV, bias=False)  # fused q, k, v (grouped-query: k, v narrower)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, h):
        q, k, v = self.qkv_proj(h).split([D, KV, KV], dim=-1)
        gate = torch.sigmoid((k * v).sum(-1, keepdim=True))
        return self.o_proj(q * gate)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(D, 2 * FF, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=False)

    def forward(self, h):
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D)
        self.self_attn = Attention()
        self.mlp = MLP()

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(h)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D, padding_idx=0)
        self.layers = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.norm = nn.LayerNorm(D)


class TinyLM(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(D, V, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for block in self.model.layers:
            h = block(h)
        return self.lm_head(self.model.norm(h))


def _tiny(**kw):
    torch.manual_seed(0)
    return TinyLM(**kw)


IDS = torch.randint(0, V, (2, 6))


def _names(suffix):
    return [f"model.layers.{i}.{suffix}" for i in range(N_LAYERS)]


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_inject_suffix_list_replaces_in_place_and_keeps_base_params():
    model = _tiny()
    before = model(IDS)
    original_sd = {k: v.clone() for k, v in model.state_dict().items()}
    old_qkv = model.model.layers[1].self_attn.qkv_proj
    replaced = lora.inject(model, ["qkv_proj", "o_proj"], r=4, lora_alpha=8)

    assert replaced == sorted(_names("self_attn.qkv_proj") + _names("self_attn.o_proj"))
    new_qkv = model.model.layers[1].self_attn.qkv_proj
    assert type(new_qkv) is lora.Linear and new_qkv.scaling == 2.0
    assert new_qkv.weight is old_qkv.weight and not new_qkv.weight.requires_grad  # reused, frozen
    assert torch.equal(model(IDS), before)  # B = 0 at init
    assert set(lora.lora_modules(model)) == set(replaced)

    sd = model.state_dict()
    assert set(sd) - set(original_sd) == {f"{n}.lora_{ab}" for n in replaced for ab in "AB"}
    result = model.load_state_dict(original_sd, strict=False)  # the pre-LoRA checkpoint still loads
    assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys)

    lora.mark_only_lora_as_trainable(model)
    per_block = 4 * (D + (D + 2 * KV)) + 4 * (D + D)
    assert _trainable(model) == N_LAYERS * per_block


def test_all_linear_excludes_lm_head_and_tied_heads():
    model = _tiny()
    linears = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    expected = sorted(n for s in linears for n in _names(s))
    assert lora.inject(model, "all-linear") == expected
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding

    tied = _tiny(tie=True)
    tied.head = tied.lm_head  # the same tied module under a name other than lm_head
    del tied.lm_head
    tied.forward = lambda ids: tied.head(tied.model.embed_tokens(ids))
    assert lora.inject(tied, "all-linear") == expected
    assert type(tied.head) is nn.Linear


def test_regex_is_fullmatched_against_full_names():
    model = _tiny()
    assert lora.inject(model, r"model\.layers\.[01]\.mlp\.(gate_up|down)_proj") == sorted(
        _names("mlp.gate_up_proj")[:2] + _names("mlp.down_proj")[:2]
    )
    with pytest.raises(lora.LoraError, match="matched no layer") as err:
        lora.inject(_tiny(), "o_proj|down_proj")  # a regex must match the whole name
    assert r'r".*\.(?:o_proj|down_proj)" would match 6 layers' in str(err.value)


def test_a_plain_name_string_matches_like_a_one_entry_list():
    assert lora.inject(_tiny(), "o_proj") == _names("self_attn.o_proj")
    assert lora.inject(_tiny(), "mlp.down_proj") == _names("mlp.down_proj")
    assert lora.inject(_tiny(), "model.layers.1.self_attn.o_proj") == ["model.layers.1.self_attn.o_proj"]
    assert (
        lora.inject(_tiny(), ["o_proj"], exclude_modules="layers.2.self_attn.o_proj")
        == _names("self_attn.o_proj")[:2]
    )


def test_exclude_modules_list_and_regex():
    replaced = lora.inject(_tiny(), ["o_proj", "down_proj"], exclude_modules=["layers.2.mlp.down_proj"])
    assert replaced == sorted(_names("self_attn.o_proj") + _names("mlp.down_proj")[:2])
    replaced = lora.inject(_tiny(), "all-linear", exclude_modules=r".*\.mlp\..*")
    assert replaced == sorted(_names("self_attn.qkv_proj") + _names("self_attn.o_proj"))


def test_slices_make_merged_linear_for_fused_qkv():
    model = _tiny()
    before = model(IDS)
    replaced = lora.inject(
        model,
        ["o_proj"],
        r=2,
        slices={"qkv_proj": ([D, KV, KV], [True, False, True])},
        lora_dtype=torch.float32,
    )
    assert replaced == sorted(_names("self_attn.qkv_proj") + _names("self_attn.o_proj"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is lora.MergedLinear
    assert qkv.split_sizes == [D, KV, KV] and qkv.enable_lora == [True, False, True]
    assert qkv.lora_A.shape == (2 * 2, D) and qkv.lora_B.shape == (D + KV, 2)
    assert torch.equal(model(IDS), before)
    lora.mark_only_lora_as_trainable(model)
    assert _trainable(model) == N_LAYERS * (2 * 2 * D + 2 * (D + KV) + 2 * (D + D))

    # slices alone target their modules
    assert lora.inject(_tiny(), [], slices={"qkv_proj": ([D, KV, KV], [False, True, True])}) == _names(
        "self_attn.qkv_proj"
    )


def test_bad_slices_raise():
    with pytest.raises(lora.LoraError, match="slices key 'q_proj' matches no layer"):
        lora.inject(_tiny(), ["o_proj"], slices={"q_proj": ([D], [True])})
    with pytest.raises(lora.LoraError, match="does not fit"):
        lora.inject(_tiny(), ["o_proj"], slices={"qkv_proj": ([D, D, D], [True, False, True])})


def test_embedding_and_conv_injection_keep_checkpoints_loadable():
    model = _tiny()
    assert lora.inject(model, ["embed_tokens"], r=4) == ["model.embed_tokens"]
    emb = model.model.embed_tokens
    assert type(emb) is lora.Embedding and emb.padding_idx == 0 and emb.lora_A.shape == (4, V)

    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))
    plain_sd = {k: v.clone() for k, v in convs.state_dict().items()}
    x = torch.randn(2, 3, 8)
    before = convs[2](convs[1](convs[0](x)).unsqueeze(-1))
    assert lora.inject(convs, r"\d+", r=2, lora_dropout=0.1) == ["0", "2"]
    assert type(convs[0]) is lora.Conv1d and type(convs[2]) is lora.Conv2d
    assert set(convs.state_dict()) == {
        f"{i}.{k}" for i in "02" for k in ("lora_A", "lora_B", "conv.weight", "conv.bias")
    }
    result = convs.load_state_dict(plain_sd, strict=False)  # plain conv keys map onto conv.weight/conv.bias
    assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys)
    assert torch.equal(convs[2](convs[1](convs[0](x)).unsqueeze(-1)), before)


def test_bf16_model_with_fp32_lora():
    model = _tiny().to(torch.bfloat16)
    lora.inject(model, "all-linear", lora_dtype=torch.float32)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.bfloat16 and qkv.lora_A.dtype == torch.float32
    assert model(IDS).dtype == torch.bfloat16


NO_MATCH = """\
inject(): target_modules=['q_proj', 'v_proj'] matched no layer LoRA can adapt.
Layers in this model (layer indices collapsed to *):
  model.embed_tokens (Embedding)
  model.layers.*.self_attn.qkv_proj (Linear)
  model.layers.*.self_attn.o_proj (Linear)
  model.layers.*.mlp.gate_up_proj (Linear)
  model.layers.*.mlp.down_proj (Linear)
  lm_head (Linear)
Fix: pass target_modules as a list of full names or dotted-name suffixes from this list \
(e.g. ['qkv_proj', 'o_proj']), as one regex fullmatched against full names (e.g. r".*\\.(qkv_proj|o_proj)"), \
or as 'all-linear'."""


def test_no_match_error_lists_layers():
    model = _tiny()
    with pytest.raises(lora.LoraError) as err:
        lora.inject(model, ["q_proj", "v_proj"])
    assert str(err.value) == NO_MATCH
    assert isinstance(err.value, ValueError)
    assert all(type(m) is not lora.Linear for m in model.modules())  # nothing was touched

    with pytest.raises(
        lora.LoraError, match=r"matched no layer LoRA can adapt after exclude_modules=\['o_proj'\]"
    ):
        lora.inject(model, ["o_proj"], exclude_modules=["o_proj"])
    lora.inject(model, ["o_proj"])
    with pytest.raises(lora.LoraError, match="matched no layer"):  # LoRA layers are not targeted twice
        lora.inject(model, ["o_proj"])


def test_layers_lora_cannot_drive_are_left_alone():
    class Int8Linear(nn.Linear):  # stands for a quantized layer: its forward does not use F.linear on weight
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)  # reads attn.out_proj.weight without calling its forward
    model.quant = Int8Linear(8, 8)
    model.proj = nn.Linear(8, 8)
    assert lora.inject(model, "all-linear") == ["proj"]
    assert type(model.attn.out_proj) is not lora.Linear and type(model.quant) is Int8Linear
