"""Using adapters elsewhere (tiny Phi-3, fp32 unless noted): split and stacked layouts, loralib files,
fusing into a plain Hugging Face model folder (`lorafit fuse`, alias `lorafit merge`), and strict,
readable loading errors.

Measured on the demo model: split <-> stacked round trips give torch.equal delta weights and identical
logits; PEFT on a Llama-fied copy of the model reads the split export with a max |logit difference|
of 0.0; the merged model loaded in a fresh process differs from base + adapter by ~6e-7 in fp32
(asserted <= 1e-4) and by ~1e-2 in bf16 (asserted <= 0.1, the bf16 rounding of the merged weights).
"""

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SLICE_TARGETS, logits, lorafit_model
from safetensors import safe_open
from safetensors.torch import save_file

from lorafit import lora
from lorafit.adapters import load_any_adapter
from lorafit.cli import main
from lorafit.errors import AdapterError
from lorafit.export import export_adapter, fuse
from lorafit.model import stacked_layout

SPLIT_LEAVES = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["whole", "slices"])
def trained(request, base, tiny_model, work):
    """(model with LoRA, its adapter folder), whole-module (all-linear) or slices (q, v, gate + o_proj)."""
    model = lorafit_model(base, "all-linear" if request.param == "whole" else SLICE_TARGETS)
    folder = lora.save_adapter(
        model, work / f"adapter-{request.param}", base_model_name_or_path=str(tiny_model)
    )
    return model, folder


def keys(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def assert_same_deltas(model, other):
    mine, theirs = lora.lora_modules(model), lora.lora_modules(other)
    assert sorted(mine) == sorted(theirs)
    for name, layer in mine.items():
        assert torch.equal(layer.delta_weight(), theirs[name].delta_weight()), name


def loaded(base, adapter, **kwargs):
    model = copy.deepcopy(base)
    load_any_adapter(model, adapter, **kwargs)
    return model.eval()


def run_cli(*args):
    return main([str(a) for a in args])


# ----------------------------------------------------------------------------- split and stacked layouts


def test_split_layout_names_the_pieces_and_round_trips_exactly(trained, base, ids, tmp_path):
    model, folder = trained
    assert (
        run_cli("export", "--adapter", folder, "--layout", "split", "--output-dir", tmp_path / "split") == 0
    )
    split = keys(tmp_path / "split")
    leaves = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in split}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in split
    assert not leaves & {"qkv_proj", "gate_up_proj"}
    if "slices" in folder.name:  # only the enabled slices: q, v and gate
        assert leaves == {"q_proj", "v_proj", "gate_proj", "o_proj"}
    else:
        assert leaves == SPLIT_LEAVES | {"o_proj", "down_proj"}
    cfg = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[1] for t in cfg["target_modules"]} == leaves
    assert cfg["rank_pattern"] == {} and cfg["r"] == 4  # every piece has the plain rank and alpha
    with safe_open(str(tmp_path / "split" / "adapter_model.safetensors"), "pt") as f:
        q_b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    q_rows = stacked_layout(base)["qkv_proj"][1][0]
    assert q_b.shape == (q_rows, 4)

    # read back onto the stacked model directly, and after converting back to the stacked layout
    assert_same_deltas(model, loaded(base, tmp_path / "split"))
    direct = copy.deepcopy(base)
    lora.load_adapter(direct, tmp_path / "split")  # the recorded layout is enough for lora.load_adapter
    assert_same_deltas(model, direct)
    assert run_cli("export", "--adapter", tmp_path / "split", "--output-dir", tmp_path / "stacked") == 0
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in keys(tmp_path / "stacked")} & {"qkv_proj"}
    back = loaded(base, tmp_path / "stacked")
    assert_same_deltas(model, back)
    assert torch.equal(logits(back, ids), logits(model, ids))
    kinds = {type(m).__name__ for m in lora.lora_modules(back).values()}
    assert kinds == ({"Linear", "MergedLinear"} if "slices" in folder.name else {"Linear"})


def llamafied(phi):
    """A LlamaForCausalLM with the Phi-3 model's weights, q/k/v and gate/up split (as vLLM sees Phi-3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=c.rope_parameters,
        tie_word_embeddings=False,
    )  # fmt: skip
    llama = LlamaForCausalLM(cfg).eval()
    layout, sd = stacked_layout(phi), {}
    for key, w in phi.state_dict().items():
        fused = next((f for f in layout if f".{f}." in key), None)
        if fused is None:
            sd[key] = w
        else:
            for piece, part in zip(layout[fused][0], w.split(layout[fused][1])):
                sd[key.replace(fused, piece)] = part
    llama.load_state_dict(sd, strict=True)
    return llama


def test_peft_on_a_llamafied_model_reads_the_split_export(trained, base, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model, folder = trained
    export_adapter(folder, tmp_path / "split", layout="split")
    llama = llamafied(base)
    assert torch.equal(logits(llama, ids), logits(base, ids))
    theirs = peft.PeftModel.from_pretrained(llama, str(tmp_path / "split")).eval()
    assert (logits(theirs, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_peft_adapter_trained_on_a_llamafied_model_loads_onto_the_fused_model(base, ids, tmp_path):
    """The other direction: separate q/k/v (and gate/up) LoRAs, each with its own A, become slices."""
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"k_proj": 2})
    theirs = peft.get_peft_model(llamafied(base), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path / "split"))
    model = loaded(base, tmp_path / "split")
    qkv = lora.lora_modules(model)["model.layers.0.self_attn.qkv_proj"]
    assert isinstance(qkv, lora.MergedLinear) and qkv.enable_lora == [True, True, True] and qkv.r == 4
    assert (logits(model, ids) - logits(theirs.eval(), ids)).abs().max().item() <= 1e-5


def test_fusing_pieces_of_different_ranks_pads_them():
    from lorafit.lora.factors import stack_loras
    from lorafit.lora.peft_format import ModuleLora

    g = torch.Generator().manual_seed(0)

    def piece(rows, r, alpha):
        return ModuleLora(
            "linear", torch.randn(r, 8, generator=g), torch.randn(rows, r, generator=g), r, alpha
        )

    layout = {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [6, 2, 2])}
    pieces = {"a.q_proj": piece(6, 2, 4), "a.v_proj": piece(2, 4, 8), "a.k_proj": piece(2, 4, 2)}
    fused, problems = stack_loras(pieces, layout)
    assert not problems and list(fused) == ["a.qkv_proj"]
    m = fused["a.qkv_proj"]
    assert m.slices == {"split_sizes": [6, 2, 2], "enable_lora": [True, True, True]} and (m.r, m.alpha) == (
        4,
        8,
    )
    layer = lora.MergedLinear(8, 10, r=4, lora_alpha=8, enable_lora=[True] * 3, split_sizes=[6, 2, 2])
    with torch.no_grad():
        layer.lora_A.copy_(m.A)
        layer.lora_B.copy_(m.B)
    want = torch.cat(
        [p.B @ p.A * (p.alpha / p.r) for p in (pieces["a.q_proj"], pieces["a.k_proj"], pieces["a.v_proj"])]
    )
    # q and v have the scale 2 of the rank-4 reference and are only zero-padded; k (scale 0.5) is rescaled
    torch.testing.assert_close(layer.delta_weight(), want, rtol=1e-6, atol=1e-6)
    _, problems = stack_loras({"a.q_proj": piece(5, 2, 4)}, layout)
    assert problems == ["wrong shape for the pieces of a.qkv_proj (rows {'q_proj': 6, 'k_proj': 2, 'v_proj': 2}): "
                        "q_proj has lora_B (5, 2), lora_A (2, 8)"]  # fmt: skip


def test_foreign_split_adapter_needs_the_stacked_layout(trained, base, tmp_path):
    """A split adapter without lorafit's metadata (e.g. trained by PEFT on a Llama-fied Phi-3)."""
    model, folder = trained
    export_adapter(folder, tmp_path / "split", layout="split")
    st = tmp_path / "split" / "adapter_model.safetensors"
    with safe_open(str(st), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(st))  # no metadata
    with pytest.raises(
        lora.LoraError, match=r"pieces of a stacked module\? pass their stacked layout to load_adapter"
    ):
        lora.load_adapter(copy.deepcopy(base), tmp_path / "split")
    assert_same_deltas(model, loaded(base, tmp_path / "split"))  # the load paths pass the model's layout
    export_adapter(tmp_path / "split", tmp_path / "stacked")  # the recorded base model gives the layout
    assert_same_deltas(model, loaded(base, tmp_path / "stacked"))


def test_generate_load_reads_split_adapters(trained, base, tiny_model, ids, tmp_path):
    from lorafit.generation import load

    model, folder = trained
    export_adapter(folder, tmp_path / "split", layout="split")
    net, tok = load(str(tiny_model), tmp_path / "split", dtype="fp32", device="cpu")
    assert tok.chat_template
    assert_same_deltas(model, net)


# ----------------------------------------------------------------------------- loralib files


def test_loralib_export_and_import(trained, base, tiny_model, tmp_path):
    model, folder = trained
    assert (
        run_cli("export", "--adapter", folder, "--layout", "loralib", "--output-dir", tmp_path / "lib") == 0
    )
    sd = torch.load(tmp_path / "lib" / "adapter_lora.pt", weights_only=True)
    expected = lora.lora_state_dict(model)
    assert sorted(sd) == sorted(expected)
    assert all(torch.equal(sd[k], expected[k]) for k in sd)
    # the .pt loads into a lorafit model the way loralib's does: load_state_dict(strict=False)
    fresh = lorafit_model(base, "all-linear" if "whole" in folder.name else SLICE_TARGETS, seed=9)
    assert not fresh.load_state_dict(sd, strict=False).unexpected_keys
    assert_same_deltas(model, fresh)

    # back to an adapter folder (alpha, ranks and slices from the adapter_lora.json written beside it)
    out = tmp_path / "from-lib"
    assert run_cli("export", "--adapter", tmp_path / "lib" / "adapter_lora.pt", "--output-dir", out) == 0
    assert keys(out) == keys(folder)
    assert_same_deltas(model, loaded(base, out))
    assert_same_deltas(model, loaded(base, tmp_path / "lib" / "adapter_lora.pt"))


def test_plain_lora_state_dict_checkpoint_converts_with_base_model(
    trained, base, tiny_model, tmp_path, capsys
):
    model, folder = trained
    pt = tmp_path / "ckpt_lora.pt"
    torch.save(lora.lora_state_dict(model), pt)  # what loralib users save: no rank, alpha or slices
    out = tmp_path / "out"
    assert run_cli("export", "--adapter", pt, "--base-model", tiny_model, "--output-dir", out) == 2
    assert "does not record lora_alpha" in capsys.readouterr().err
    args = ["export", "--adapter", pt, "--base-model", tiny_model, "--output-dir", out, "--lora-alpha", "8"]
    if "slices" in folder.name:  # q+v and q+k have the same shapes here (no GQA): ambiguous
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert "q_proj+k_proj or q_proj+v_proj" in err and "pass --target-modules" in err
        args += ["--target-modules", *SLICE_TARGETS]
    assert run_cli(*args) == 0
    assert keys(out) == keys(folder)
    assert_same_deltas(model, loaded(base, out))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_loralib_files_are_never_unpickled(base, tiny_model, tmp_path, capsys):
    pt = tmp_path / "evil.pt"
    torch.save({"model.layers.0.self_attn.o_proj.lora_A": Payload()}, pt)
    with pytest.raises(AdapterError, match="not a readable loralib checkpoint"):
        export_adapter(pt, tmp_path / "out", base_model=str(tiny_model), lora_alpha=8)
    assert "unpickled!" not in capsys.readouterr().out
    pt.rename(tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled .bin files are never loaded"):
        load_any_adapter(copy.deepcopy(base), tmp_path / "adapter_model.bin", lora_alpha=8)


# ----------------------------------------------------------------------------- merging

FRESH = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\\n"), prompt
    assert model.generation_config.eos_token_id, model.generation_config
    with torch.no_grad():
        out = model(torch.load(sys.argv[2])).logits
    torch.save(out, sys.argv[3])
    assert not [m for m in sys.modules if m.startswith(("lorafit", "peft"))]
    print(model.dtype)
    """
)


def test_fuse_writes_a_plain_hf_model_with_the_adapters_logits(trained, base, tiny_model, ids, tmp_path):
    model, folder = trained
    out = tmp_path / "merged"
    assert run_cli("fuse", "--model", tiny_model, "--adapter", folder, "--output-dir", out) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors"} <= names
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # written atomically
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        merged_keys = set(f.keys())
    assert merged_keys == set(base.state_dict())  # plain module names, no lora_ keys
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("torch.float32")
    merged = torch.load(tmp_path / "logits.pt")
    assert (merged - logits(model, ids)).abs().max().item() <= 1e-4
    assert (merged - logits(base, ids)).abs().max().item() > 0.1


def test_merge_in_bf16_rounds_once_and_keeps_the_logits_close(trained, base, tiny_model, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model, folder = trained
    out = fuse(None, folder, tmp_path / "merged", dtype="bf16")  # base from adapter_config.json
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert merged.dtype == torch.bfloat16
    name = "model.layers.0.self_attn.qkv_proj"
    layer = lora.lora_modules(model)[name]
    expected = (base.get_submodule(name).weight.bfloat16().float() + layer.delta_weight()).bfloat16()
    assert torch.equal(merged.get_submodule(name).weight, expected)
    adapted = loaded(copy.deepcopy(base).bfloat16(), folder)
    diff = (logits(merged, ids).float() - logits(adapted, ids).float()).abs().max().item()
    assert diff <= 0.1


def _folder_tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_lorafit_merge_and_lorafit_fuse_and_the_deprecated_api_alias_write_the_same_model(
    trained, tiny_model, tmp_path
):
    import lorafit

    _, folder = trained
    assert run_cli("fuse", "--adapter", folder, "--output-dir", tmp_path / "fuse") == 0
    assert run_cli("merge", "--adapter", folder, "--output-dir", tmp_path / "merge") == 0
    with pytest.warns(DeprecationWarning, match="use lorafit.fuse"):
        lorafit.merge_adapter(None, folder, tmp_path / "api-alias")
    lorafit.fuse(tiny_model, folder, tmp_path / "api")
    want = _folder_tensors(tmp_path / "fuse")
    for other in ("merge", "api-alias", "api"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == sorted(
            p.name for p in (tmp_path / "fuse").iterdir()
        )
        assert (tmp_path / other / "config.json").read_text() == (
            tmp_path / "fuse" / "config.json"
        ).read_text()
        got = _folder_tensors(tmp_path / other)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), other


def test_layout_fused_is_the_old_name_of_stacked(trained, tmp_path, capsys):
    _, folder = trained
    assert run_cli("export", "--adapter", folder, "--layout", "fused", "--output-dir", tmp_path / "old") == 0
    assert "wrote the stacked adapter" in capsys.readouterr().out
    export_adapter(folder, tmp_path / "new", layout="stacked")
    assert keys(tmp_path / "old") == keys(tmp_path / "new")
    assert (tmp_path / "old" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "new" / "adapter_model.safetensors"
    ).read_bytes()


def test_split_exports_record_their_stacked_layout_under_the_key_older_lorafit_reads(trained, tmp_path):
    """The metadata key stays "fused" (lorafit's word before "stacked"), so older lorafit reads new files
    and new lorafit reads old ones."""
    _, folder = trained
    export_adapter(folder, tmp_path / "split", layout="split")
    meta = lora.read_adapter(tmp_path / "split").meta
    assert set(meta["fused"]) == {"qkv_proj", "gate_up_proj"}
    assert meta["fused"]["qkv_proj"]["pieces"] == ["q_proj", "k_proj", "v_proj"]


def test_load_adapter_fused_keyword_is_deprecated_and_still_works(trained, base, tmp_path):
    model, folder = trained
    export_adapter(folder, tmp_path / "split", layout="split")
    st = tmp_path / "split" / "adapter_model.safetensors"
    with safe_open(str(st), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(st))  # no recorded layout: the keyword must supply it
    old, new = copy.deepcopy(base), copy.deepcopy(base)
    with pytest.warns(DeprecationWarning, match="pass stacked="):
        lora.load_adapter(old, tmp_path / "split", fused=stacked_layout(base))
    lora.load_adapter(new, tmp_path / "split", stacked=stacked_layout(base))
    assert_same_deltas(model, old)
    assert_same_deltas(model, new)


def test_merge_refuses_to_overwrite(trained, tiny_model, tmp_path, capsys):
    _, folder = trained
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("merge", "--adapter", folder, "--output-dir", out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run_cli("merge", "--adapter", folder, "--output-dir", tiny_model, "--overwrite") == 2
    assert "holds the input" in capsys.readouterr().err
    assert run_cli("merge", "--adapter", folder, "--output-dir", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


# ----------------------------------------------------------------------------- strict, readable loading


@pytest.fixture
def adapter(base, tiny_model, tmp_path):
    model = lorafit_model(base, SLICE_TARGETS)
    return lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_model))


def rewrite(folder, edit):
    st = folder / "adapter_model.safetensors"
    with safe_open(str(st), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(st), metadata=meta)


def test_every_missing_unexpected_and_wrong_shape_key_is_reported_at_once(base, adapter):
    p = "base_model.model.model.layers."

    def edit(t):
        del t[p + "0.self_attn.o_proj.lora_B.weight"]
        t[p + "1.self_attn.o_proj.lora_A.weight"] = torch.zeros(4, 7)
        t[p + "0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 4)
        t[p + "0.self_attn.nope.lora_B.weight"] = torch.zeros(4, 4)
        t[p + "1.self_attn.nope.lora_B.weight"] = torch.zeros(4, 4)
        t["model.stray"] = torch.zeros(1)

    rewrite(adapter, edit)
    model = copy.deepcopy(base)
    with pytest.raises(lora.LoraError) as e:
        lora.load_adapter(model, adapter)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "unexpected key model.stray" in msg
    assert "missing key: model.layers.0.self_attn.o_proj has lora_A but no lora_B" in msg
    assert "missing key: model.layers.1.self_attn.nope has lora_B but no lora_A" in msg
    assert "the model has no module 'model.layers.0.self_attn.nope'" in msg
    assert "wrong shape for model.layers.1.self_attn.o_proj" in msg and "(4, 7)" in msg
    assert not lora.lora_modules(model)  # nothing was changed


def test_adapter_for_another_base_model_is_refused_naming_both(
    adapter, tiny_model, other_tiny_model, tmp_path, capsys
):
    other = other_tiny_model
    assert run_cli("merge", "--model", other, "--adapter", adapter, "--output-dir", tmp_path / "m") == 2
    err = capsys.readouterr().err.rpartition("error: ")[2]  # after transformers' progress bars
    assert err.startswith("adapter ") and f"trained on base model {tiny_model}" in err
    assert f"not on this model ({other})" in err and "[384, 128]" in err and "[768, 256]" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(base, adapter, tmp_path, capsys, damage):
    st = adapter / "adapter_model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x93garbage" * 64)
    with pytest.raises(lora.LoraError, match="corrupt or truncated safetensors file"):
        lora.load_adapter(copy.deepcopy(base), adapter)
    assert run_cli("export", "--adapter", adapter, "--layout", "split", "--output-dir", tmp_path / "s") == 2
    assert "error: " in capsys.readouterr().err


def test_the_library_says_what_to_do_and_the_pipeline_adds_the_lorafit_advice(base, adapter):
    st = adapter / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(lora.LoraError) as library:
        lora.load_adapter(copy.deepcopy(base), adapter)
    assert str(library.value).endswith("Fix: copy the adapter again.") and "checkpoint-" not in str(
        library.value
    )
    with pytest.raises(AdapterError) as pipeline:
        load_any_adapter(copy.deepcopy(base), adapter)
    assert str(pipeline.value).endswith(
        "Fix: copy the adapter again, or use an earlier checkpoint-<step>/ folder."
    )


def test_missing_config_and_pickled_bin_are_refused(base, tiny_model, adapter, tmp_path, capsys):
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(lora.LoraError, match="adapter_config.json: missing"):
        lora.load_adapter(copy.deepcopy(base), adapter)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    assert run_cli("merge", "--adapter", pickled, "--model", tiny_model, "--output-dir", tmp_path / "m") == 2
    captured = capsys.readouterr()
    assert "error: " in captured.err and "adapter_model.bin is never loaded" in captured.err
    assert "unpickled!" not in captured.out


def test_cli_help_lists_fuse_merge_and_export(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "fuse" in out and "merge" in out and "export" in out
    for command in ("fuse", "merge"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--dtype" in capsys.readouterr().out
