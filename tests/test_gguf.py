"""GGUF in and out, read back with the gguf package (llama.cpp itself: tests/test_gguf_llama_cpp.py, slow).

- a model lorafit writes as GGUF loads back through transformers' GGUF reader with the same logits
  (measured: max |difference| 0.0 for the tiny Llama and Phi-3 in f32), and its tokenizer with the chat
  template; the log says what the weights were stored as;
- adapter.gguf has llama.cpp's names, shapes and metadata; Llama q/k B rows are permuted the way
  llama.cpp permutes the weights (and unpermuting gives lorafit's B back); Phi-3 q/v slice adapters
  become one LoRA on the fused attn_qkv, with zero rows for k;
- an adapter trained on one GGUF file is refused on another; unmapped architectures are refused.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from conftest import SLICE_TARGETS, logits, lorafit_model
from families import write_family_model

from lorafit import lora
from lorafit.adapters import load_any_adapter
from lorafit.config import ModelConfig
from lorafit.errors import AdapterError
from lorafit.export import export_adapter, fuse
from lorafit.gguf_export import arch_of, permute_rows, unpermute_rows, write_model_gguf
from lorafit.model import load_model, load_tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install 'lorafit[gguf]')")


_FOLDERS: dict = {}


def family_folder(name: str, factory) -> Path:
    """A tiny Mistral (written as llama.cpp's llama) or Phi-3 with its family's real tokenizer and chat
    template, as a Hugging Face folder (tests/families.py; the gguf package needs a real tokenizer)."""
    if name not in _FOLDERS:
        _FOLDERS[name] = write_family_model(name, factory.mktemp(name) / "hf")
    return _FOLDERS[name]


@pytest.fixture(scope="module", params=["mistral", "phi3"])
def base_folder(request, tmp_path_factory):
    return family_folder(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory):
    return family_folder("mistral", tmp_path_factory)


def fields(path):
    r = gguf.GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


def test_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(32, 5)
    p = permute_rows(w, 4)
    assert not torch.equal(p, w) and torch.equal(unpermute_rows(p, 4), w)
    undone = LlamaTensorProcessor()._reverse_permute_weights(p.numpy(), 4, 4)
    assert torch.equal(torch.from_numpy(undone), w)


def test_model_gguf_loads_back_with_the_same_logits(mistral_folder, ids, tmp_path, caplog):
    """Llama's permuted q/k round-trip (transformers' GGUF reader takes ~5 s of CPU per model: the
    slow llama.cpp tests read Phi-3 back too)."""
    from transformers import AutoModelForCausalLM

    base_folder = mistral_folder

    hf = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    path = tmp_path / "base.gguf"
    info = write_model_gguf(path, hf, kind="f32", tokenizer_dir=base_folder)
    reader, meta = fields(path)
    assert meta["general.architecture"] == info["arch"] and meta["general.type"] == "model"
    assert meta["tokenizer.chat_template"] == load_tokenizer(str(base_folder)).chat_template
    with caplog.at_level(logging.INFO, logger="lorafit"):
        net = load_model(ModelConfig(name_or_path=str(path), device="cpu"), training=False)
    assert "base.gguf: read from F32" in caplog.text
    assert net.lorafit_base_gguf["name"] == "base.gguf" and len(net.lorafit_base_gguf["sha256"]) == 64
    assert (logits(hf, ids) - logits(net, ids)).abs().max().item() == 0.0


def test_adapter_gguf_names_shapes_metadata_and_permuted_b(base_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    llama = hf.config.model_type == "mistral"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if llama else SLICE_TARGETS
    model = lorafit_model(hf, targets)
    lora.save_adapter(model, tmp_path / "a", base_model_name_or_path=str(base_folder))
    out = export_adapter(tmp_path / "a", tmp_path / "g", layout="gguf", gguf_type="f32")
    reader, meta = fields(out / "adapter.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    layers = lora.lora_modules(model)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    if llama:
        assert meta["adapter.lora.alpha"] == 8.0  # r=4, alpha=8 everywhere: written as is
        assert sorted(tensors)[:4] == ["blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b",
                                       "blk.0.attn_output.weight.lora_a", "blk.0.attn_output.weight.lora_b"]  # fmt: skip
        for leaf, heads in (("q_proj", 4), ("k_proj", 2), ("v_proj", None)):
            layer = layers[f"model.layers.1.self_attn.{leaf}"]
            b = tensors[f"blk.1.attn_{leaf[0]}.weight.lora_b"]
            assert torch.equal(tensors[f"blk.1.attn_{leaf[0]}.weight.lora_a"], layer.lora_A.detach())
            assert torch.equal(unpermute_rows(b, heads) if heads else b, layer.lora_B.detach())
            assert heads is None or not torch.equal(b, layer.lora_B.detach())
    else:  # Phi-3: q and v slices of the fused qkv -> one rank-8 LoRA on attn_qkv with zero k rows; its
        # scale (alpha 8 per slice, rank 4 per slice = 2) is folded into B under the one alpha 8 that
        # fits o_proj and the gate slice (rank 4)
        assert meta["adapter.lora.alpha"] == 8.0
        a, b = tensors["blk.0.attn_qkv.weight.lora_a"], tensors["blk.0.attn_qkv.weight.lora_b"]
        assert a.shape == (8, 64) and b.shape == (128, 8)  # rows: q 64, k 32, v 32
        assert b[64:96].abs().max() == 0 and b[:64, 4:].abs().max() == 0 and b[96:, :4].abs().max() == 0
        merged = (layers["model.layers.0.self_attn.qkv_proj"].delta_weight()).float()
        assert torch.allclose(b @ a * 8.0 / 8, merged, atol=1e-6)  # llama.cpp: alpha / rank(a)
        assert "blk.0.ffn_up.weight.lora_a" in tensors  # gate slice of the fused gate_up
    ne = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # GGUF order: ne[0] is the row length
    for name in (n for n in ne if n.endswith(".lora_a")):  # llama-adapter.cpp's check: a->ne[1] == b->ne[0]
        assert ne[name][1] == ne[name[:-1] + "b"][0]
    out16 = export_adapter(tmp_path / "a", tmp_path / "g16", layout="gguf", gguf_type="bf16")
    types = {t.tensor_type.name for t in gguf.GGUFReader(out16 / "adapter.gguf").tensors}
    assert types == {"BF16"}


def test_fuse_gguf_writes_a_complete_model(base_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    model = lorafit_model(hf, ["q_proj", "v_proj"])
    lora.save_adapter(model, tmp_path / "a", base_model_name_or_path=str(base_folder))
    out = fuse(None, tmp_path / "a", tmp_path / "m", format="gguf", gguf_type="q8_0")
    reader, meta = fields(out / "model.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta[f"{meta['general.architecture']}.block_count"] == 2
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["token_embd.weight"] == "Q8_0" and names["blk.0.attn_norm.weight"] == "F32"
    assert "tokenizer.ggml.tokens" in reader.fields and "tokenizer.chat_template" in reader.fields


def test_adapter_from_one_gguf_is_refused_on_another(base_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    model = lorafit_model(hf, ["v_proj"] if hf.config.model_type == "mistral" else ["qkv_proj"])
    trained_on = {"name": "a.gguf", "size": 1, "sha256": "a" * 64}
    lora.save_adapter(model, tmp_path / "a", base_model_name_or_path="a.gguf",
                      extra_metadata={"base_gguf": trained_on})  # fmt: skip
    other = copy.deepcopy(hf)
    other.lorafit_base_gguf = {"name": "b.gguf", "size": 2, "sha256": "b" * 64}
    with pytest.raises(AdapterError, match=r"trained on the GGUF file a\.gguf .* this base is b\.gguf"):
        load_any_adapter(other, tmp_path / "a")
    other.lorafit_base_gguf = trained_on
    assert load_any_adapter(other, tmp_path / "a")


def test_unmapped_architectures_are_refused_with_the_list():
    from transformers import GemmaConfig

    with pytest.raises(AdapterError) as e:
        arch_of(GemmaConfig())
    assert (
        "'gemma'" in str(e.value)
        and "phi3 (as phi3)" in str(e.value)
        and "mistral (as llama)" in str(e.value)
    )
