"""The training pipeline's invariants on a tiny Phi-3: loss head, accumulation, slice targeting, pad token."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafit import lora
from lorafit.config import PeftConfig
from lorafit.data import Conversation
from lorafit.loss import linear_cross_entropy, loss_sum
from lorafit.model import apply_lora, end_of_turn, fix_pad_token, plan_lora, stop_token_ids
from lorafit.optim import lr_lambda
from lorafit.packing import collate, pack
from lorafit.tiny import build_model
from lorafit.tokens import tokenize


def convs(n: int = 12) -> list[Conversation]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"{100 + 37 * i}: even or odd?"},
                {"role": "assistant", "content": "odd" if i % 2 else "even"}]  # fmt: skip
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        out.append(Conversation(msgs, f"mem:{i}"))
    return out


def test_linear_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy(h, w, y)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, y, reduction="sum")
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-5)
    assert torch.allclose(gh, h.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_loss_sum_equals_model_logits_cross_entropy(tok):
    model = build_model(tok)
    data, _ = tokenize(tok, convs(), max_seq_length=128, end_of_turn="<|end|>")
    batch = collate(data, pack(data, 128), tok.pad_token_id)
    n = batch.pop("num_targets")
    fast = loss_sum(model, batch)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    sel = batch["labels"] != -100
    ref = F.cross_entropy(logits[sel], batch["labels"][sel], reduction="sum")
    assert int(sel.sum()) == n
    assert torch.allclose(fast, ref, rtol=1e-5)


def _step_grads(model, data, rows_per_micro: list[list[list[int]]], pad_id: int) -> dict:
    """The gradient of one step over the given micro-batches, token-weighted as train.run does."""
    micro = [collate(data, rows, pad_id) for rows in rows_per_micro]
    n_targets = sum(b.pop("num_targets") for b in micro)
    for b in micro:
        (loss_sum(model, b) / n_targets).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_token_weighted_accumulation_equals_one_big_batch(tok):
    """Splitting a step into micro-batches of different target counts gives the same update."""
    data, _ = tokenize(tok, convs(16), max_seq_length=64, end_of_turn="<|end|>")
    rows = [[i] for i in range(len(data))]  # one conversation per row: unequal targets per micro-batch
    base = build_model(tok)
    apply_lora(base, PeftConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"))
    with torch.no_grad():  # B != 0 so every factor gets a gradient
        for layer in lora.lora_modules(base).values():
            layer.lora_B.normal_(0, 0.02)
    big = _step_grads(copy.deepcopy(base), data, [rows], tok.pad_token_id)
    split = _step_grads(copy.deepcopy(base), data, [rows[:3], rows[3:11], rows[11:]], tok.pad_token_id)
    assert big.keys() == split.keys() and len(big) == 32
    for k in big:
        assert torch.allclose(big[k], split[k], rtol=1e-4, atol=1e-7), k
    # a plain per-micro-batch mean (what token weighting avoids) would give a different gradient
    naive = copy.deepcopy(base)
    for rows_i in (rows[:3], rows[3:11], rows[11:]):
        b = collate(data, rows_i, tok.pad_token_id)
        (loss_sum(naive, b) / b.pop("num_targets") / 3).backward()
    k = next(iter(big))
    assert not torch.allclose(dict(naive.named_parameters())[k].grad, big[k], rtol=1e-3)


def test_q_v_targets_adapt_only_those_slices_of_fused_qkv(tok):
    model = build_model(tok)
    cfg = model.config
    plan = plan_lora(model, ["q_proj", "v_proj"])
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert plan.slices == {"qkv_proj": ([cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd,
                                         cfg.num_key_value_heads * hd], [True, False, True])}  # fmt: skip
    names = apply_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(cfg.num_hidden_layers)]
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, lora.MergedLinear) and layer.enable_lora == [True, False, True]
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.delta_weight()
    q, k = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    assert torch.count_nonzero(delta[q : q + k]) == 0  # k untouched
    assert torch.count_nonzero(delta[:q]) > 0 and torch.count_nonzero(delta[q + k :]) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".qkv_proj.lora_" in n for n in trainable)
    per_layer = 4 * 2 * cfg.hidden_size + (q + k) * 4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == per_layer * cfg.num_hidden_layers


def test_fused_and_slice_names_together_is_an_error(tok):
    from lorafit.errors import ConfigError

    with pytest.raises(ConfigError, match="both 'qkv_proj' and its slice 'q_proj'"):
        plan_lora(build_model(tok), ["qkv_proj", "q_proj"])


def test_one_module_name_as_a_string_targets_that_module_or_slice(tok):
    model = build_model(tok)
    n = model.config.num_hidden_layers
    names = apply_lora(model, PeftConfig(r=4, target_modules="qkv_proj"))
    assert names == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(n)]
    assert type(model.model.layers[0].self_attn.qkv_proj) is lora.Linear
    assert plan_lora(build_model(tok), "q_proj").slices["qkv_proj"][1] == [True, False, False]


def test_all_linear_on_phi3_is_the_four_fused_modules(tok):
    model = build_model(tok)
    names = apply_lora(model, PeftConfig())
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    assert leaves == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert not any("lm_head" in n for n in names)


def test_pad_token_is_never_a_stop_token(tok):
    t = copy.deepcopy(tok)
    t.pad_token = "<|endoftext|>"  # what the real Phi-3 tokenizer ships
    fix_pad_token(t)
    assert t.pad_token not in ("<|endoftext|>", "<|end|>") and t.pad_token == "<unk>"
    assert end_of_turn(t) == "<|end|>"
    ids = stop_token_ids(t)
    assert t.convert_tokens_to_ids("<|end|>") in ids and t.convert_tokens_to_ids("<|endoftext|>") in ids


def test_schedules_warm_up_and_decay():
    cos = lr_lambda("cosine", warmup=4, total=20)
    lin = lr_lambda("linear", warmup=0, total=10)
    const = lr_lambda("constant_with_warmup", warmup=2, total=10)
    assert cos(0) < cos(3) < 1.0 and cos(4) == pytest.approx(1.0) and cos(19) < 0.05
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert const(0) < 1.0 and const(9) == 1.0


def test_trained_biases_are_saved_and_reloaded(tmp_path):
    """bias="all": the trainable biases go into the adapter and come back on load."""
    import torch.nn as nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    model = net()
    lora.inject(model, ["0", "2"], r=2, lora_alpha=4)
    lora.mark_only_lora_as_trainable(model, bias="all")
    with torch.no_grad():
        model[0].bias.add_(1.0)
        model[2].lora_B.normal_()
    lora.save_adapter(model, tmp_path, bias="all")
    fresh = net()
    lora.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(fresh[0].bias, model[0].bias)
    assert torch.allclose(fresh(x), model(x))


def test_frozen_linears_held_in_bf16_compute_what_autocast_did(tok):
    """bf16 training: storing the frozen linear weights in bf16 changes no bit of the loss or gradients."""
    from lorafit.model import hold_frozen_linears_in
    from lorafit.precision import autocast

    model = build_model(tok)
    apply_lora(model, PeftConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():  # B = 0 at init would hide the LoRA path
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
    held = copy.deepcopy(model)
    saved = hold_frozen_linears_in(held, torch.bfloat16)
    data, _ = tokenize(tok, convs(), max_seq_length=128, end_of_turn="<|end|>")
    batch = collate(data, pack(data, 128), tok.pad_token_id)
    results = []
    for m in (model, held):
        with autocast(torch.device("cpu"), "bf16"):
            loss = loss_sum(m, batch, torch.bfloat16)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    frozen_linear = sum(
        p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear)
        for p in mod.parameters(False) if not p.requires_grad
    )  # fmt: skip
    assert saved == 2 * frozen_linear
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    assert dtypes["lm_head.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # not autocast: stays
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n)


def test_casting_the_linears_frees_the_checkpoint_block_they_shared(tok):
    """Weights loaded as views of one block (as transformers loads a checkpoint): after the linears are
    cast, nothing views the block any more, so it is freed; every value is unchanged."""
    from lorafit.model import hold_frozen_linears_in

    model = build_model(tok)
    params = list(model.parameters())
    block = torch.cat([p.detach().reshape(-1) for p in params])
    at = 0
    for p in params:
        p.data = block[at : at + p.numel()].view_as(p)
        at += p.numel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.requires_grad_(False)
    hold_frozen_linears_in(model, torch.bfloat16)
    ptr = block.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() != ptr for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.float(), before[n].to(p.dtype).float()), n


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_casting_the_linears_releases_the_mapped_checkpoint_file(tiny_model):
    """transformers 5 maps a safetensors checkpoint and gives each tensor a storage inside the mapping;
    after the linears are cast to bf16, the embeddings and norms get copies, and the file is unmapped."""
    import gc

    from transformers import AutoModelForCausalLM

    from lorafit.model import hold_frozen_linears_in

    def mapped() -> bool:
        return str(tiny_model / "model.safetensors") in Path("/proc/self/maps").read_text()

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if not mapped():
        pytest.skip("this transformers/safetensors read the checkpoint into memory instead of mapping it")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.requires_grad_(False)
    hold_frozen_linears_in(model, torch.bfloat16)
    gc.collect()
    assert not mapped()
    for n, p in model.named_parameters():
        assert torch.equal(p.float(), before[n].to(p.dtype).float()), n


def test_a_head_tied_to_the_embedding_stays_fp32(tok):
    from lorafit.model import hold_frozen_linears_in

    model = build_model(tok)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    hold_frozen_linears_in(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_adamw_is_fused_on_cuda_and_torch_default_elsewhere():
    from lorafit.config import TrainingConfig
    from lorafit.optim import make_optimizer

    model = torch.nn.Linear(4, 4)
    cuda = make_optimizer(model, TrainingConfig(), torch.device("cuda", 0))  # a device type, no GPU needed
    assert cuda.defaults["fused"] is True
    assert not make_optimizer(model, TrainingConfig(), torch.device("cpu")).defaults["fused"]


def test_gradient_checkpointing_auto_turns_on_only_when_activations_would_not_fit(monkeypatch):
    from transformers import Phi3Config

    from lorafit import memory

    config = Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32)  # Phi-3-mini
    per_token = 32 * (12 * 3072 + 5 * 8192) * 2
    assert memory.activation_bytes(config, 4 * 2048, torch.bfloat16) == 4 * 2048 * per_token  # 38 GiB
    monkeypatch.setattr(memory, "free_bytes", lambda device: 200 * 2**30)
    on, why = memory.needs_checkpointing(config, 4 * 2048, torch.bfloat16, torch.device("cpu"))
    assert (on, why.split(" (")[0]) == (False, "off")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 60 * 2**30)
    on, why = memory.needs_checkpointing(config, 4 * 2048, torch.bfloat16, torch.device("cpu"))
    assert on and why.startswith("on (auto: activations ~38.0 GiB per micro-batch of 8,192 tokens")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 200 * 2**30)  # room enough, but a 4-bit base
    on, why = memory.needs_checkpointing(
        config, 4 * 2048, torch.bfloat16, torch.device("cpu"), quantized=True
    )
    assert on and why.startswith("on (auto: a quantized base, memory first")


def test_unpacked_training_feeds_each_micro_batch_as_one_unpadded_row(tiny_model, tmp_path, monkeypatch):
    """packing: false on lorafit_sdpa: every micro-batch reaches collate as one row of its conversations
    (no padding computed), eval too; the loss is the same as from the padded rows (tests/
    test_attention_kernels.py pins that)."""
    from conftest import write_jsonl

    import lorafit
    import lorafit.evaluation
    import lorafit.train

    seen = []

    def spy(real):
        def collate_(data, rows, pad_id, pad_to=None):
            seen.append(len(rows))
            return real(data, rows, pad_id, pad_to)

        return collate_

    monkeypatch.setattr(lorafit.train, "collate", spy(lorafit.train.collate))
    monkeypatch.setattr(lorafit.evaluation, "collate", spy(lorafit.evaluation.collate))
    records = [{"messages": c.messages} for c in convs(12)]
    data = write_jsonl(tmp_path / "d.jsonl", *records)
    res = lorafit.finetune(
        model=str(tiny_model), train_data=data, eval_data=data, output_dir=tmp_path / "out", progress=False,
        training_config={"max_steps": 2, "per_device_train_batch_size": 4, "packing": False, "max_seq_length": 64,
                         "save_strategy": "no", "post_check": False},
    )  # fmt: skip
    assert seen and set(seen) == {1}, seen  # 4 conversations per micro-batch, always in one row
    assert 0 < res["eval_loss"] < 20 and res["train_loss"] < 20  # finite numbers from both paths
