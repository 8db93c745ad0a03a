"""lorafit's GGUF outputs run in llama.cpp itself (llama-cpp-python built from its sdist: tests/real_files.py),
compared with lorafit on the same token ids. Slow: the first run builds llama.cpp.

1. adapter.gguf on a base GGUF lorafit wrote (tiny random Mistral-as-llama and Phi-3 with real
   tokenizers; f32 and f16 base), the adapter on q/k/v/o and the MLP (Phi-3: q/v slices of the fused
   qkv plus the gate slice of gate_up): next-token logits at every position within TOL of lorafit's
   (base read back from that GGUF through `--model file.gguf`), the same greedy continuations;
2. the merged model (`fuse --format gguf`, f16): the same;
3. SmolLM2-135M-Instruct Q4_1 (real weights): a few training steps on the GGUF through lorafit, the
   adapter exported, base + adapter in llama.cpp against lorafit on 20 chat prompts: greedy answers and
   logit differences are printed (run with -s) and must mostly agree.

Measured figures are in CHANGELOG.md / README.md ("Run it in llama.cpp / Ollama").
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SLICE_TARGETS, lorafit_model, write_jsonl
from families import write_family_model
from real_files import llama_cpp, smollm2_gguf

import lorafit
from lorafit import lora
from lorafit.config import ModelConfig
from lorafit.export import export_adapter, fuse
from lorafit.gguf_export import write_model_gguf
from lorafit.model import load_model

pytestmark = pytest.mark.slow
pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install 'lorafit[gguf]')")

TOL = {
    "f32": 2e-3,
    "f16": 5e-2,
}  # max |logit difference|; f16: the base rounded to f16 on both sides? no: see below
PROMPTS = [
    [1, 450, 4996, 17354, 1701, 29916],
    [1, 306, 763, 304, 1048, 278, 1556, 3942],
    [1, 3532, 29892, 920],
]


def llama(path, lora_path=None):
    cpp = llama_cpp()
    return cpp.Llama(model_path=str(path), lora_path=str(lora_path) if lora_path else None, n_ctx=128,
                     logits_all=True, n_threads=2, seed=0, verbose=False)  # fmt: skip


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def cpp_greedy(llm, ids: list[int], n: int, stops=()) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in stops:
            break
        out.append(tok)
        llm.eval([tok])
    return out


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model, ids: list[int], n: int, stops=()) -> list[int]:
    out, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if tok in stops:
                break
            out.append(tok)
            seq.append(tok)
    return out


@pytest.fixture(scope="module", params=["mistral", "phi3"])
def family(request, tmp_path_factory):
    """(family, HF folder, f32 base GGUF, f16 base GGUF) of a tiny random model with a real tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    folder = write_family_model(request.param, root / "hf", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # larger weights than transformers' 0.02: logits that differ between tokens
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    hf.save_pretrained(folder)
    for kind in ("f32", "f16"):
        write_model_gguf(root / f"base-{kind}.gguf", hf, kind=kind, tokenizer_dir=folder)
    return request.param, folder, root


def adapted(family, kind: str, tmp_path):
    """lorafit: the base read from base-KIND.gguf with a random adapter; the adapter saved and exported."""
    name, folder, root = family
    base = root / f"base-{kind}.gguf"
    net = load_model(ModelConfig(name_or_path=str(base), device="cpu", dtype="fp32"), training=False).eval()
    targets = SLICE_TARGETS if name == "phi3" else ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    model = lorafit_model(net, targets, seed=5)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    out = export_adapter(tmp_path / "adapter", tmp_path / "gguf", layout="gguf", gguf_type="f32")
    return base, model, out / "adapter.gguf"


def compare(model, llm, report: dict, stops=()) -> None:
    diffs, same = [], 0
    for ids in PROMPTS:
        diffs.append(float(np.abs(torch_logits(model, ids) - cpp_logits(llm, ids)).max()))
        same += torch_greedy(model, ids, 12, stops) == cpp_greedy(llm, ids, 12, stops)
    report.update(max_abs_logit_diff=max(diffs), greedy_equal=f"{same}/{len(PROMPTS)}")


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_adapter_gguf_in_llama_cpp_gives_lorafits_logits(family, kind, tmp_path):
    base, model, adapter = adapted(family, kind, tmp_path)
    report = {"case": f"adapter.gguf on {family[0]} {kind} base"}
    with_lora = llama(base, adapter)
    compare(model, with_lora, report)
    # the adapter matters: without it llama.cpp is far from lorafit's adapted logits
    plain = llama(base)
    report["without_adapter"] = float(
        np.abs(torch_logits(model, PROMPTS[0]) - cpp_logits(plain, PROMPTS[0])).max()
    )
    print(json.dumps(report))
    assert report["without_adapter"] > 10 * report["max_abs_logit_diff"]
    assert report["max_abs_logit_diff"] <= TOL[kind]
    assert report["greedy_equal"] == f"{len(PROMPTS)}/{len(PROMPTS)}"


def test_merged_f16_gguf_in_llama_cpp_gives_lorafits_logits(family, tmp_path):
    base, model, _ = adapted(family, "f32", tmp_path)
    out = fuse(str(base), tmp_path / "adapter", tmp_path / "merged", format="gguf", gguf_type="f16")
    report = {"case": f"merged f16 model.gguf, {family[0]}"}
    compare(model, llama(out / "model.gguf"), report)
    print(json.dumps(report))
    assert report["max_abs_logit_diff"] <= TOL["merged-f16"]
    assert report["greedy_equal"] == f"{len(PROMPTS)}/{len(PROMPTS)}"


QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish.",
    "What animal says moo?", "What is the opposite of hot?", "How many days are in a week?",
    "What color is the sky on a clear day?", "Name a fruit that is yellow.", "What do bees make?",
    "What is frozen water called?", "Which planet do we live on?", "What is the first letter of the alphabet?",
    "How many legs does a spider have?", "What do you use to write on paper?", "What is the largest ocean?",
    "Name a day of the weekend.", "What is 10 minus 3?", "What language is spoken in Brazil?",
    "What shape has three sides?",
]  # fmt: skip


def test_smollm2_q4_1_trained_through_lorafit_runs_in_llama_cpp(tmp_path):
    """The real quantized base: train on the GGUF itself, export the adapter, compare greedy answers."""
    base = smollm2_gguf()
    llama_cpp()  # skip early when llama.cpp cannot be built
    data = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "Answer: I like cheese."},
            ]
        }
        for q in QUESTIONS[:8]
    ]
    train = write_jsonl(tmp_path / "train.jsonl", *data)
    res = lorafit.finetune(
        model=str(base), train_data=str(train), output_dir=str(tmp_path / "run"), progress=False,
        training_config={"max_steps": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 4,
                         "save_strategy": "no", "lr_scheduler_type": "constant", "max_seq_length": 96},
        peft_config={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    )  # fmt: skip
    adapter_dir = tmp_path / "run"
    meta = lora.read_adapter(adapter_dir).meta
    assert meta["base_gguf"]["name"] == base.name
    out = export_adapter(adapter_dir, tmp_path / "gguf", layout="gguf", gguf_type="f32")
    model, tok = lorafit.load(str(base), adapter=str(adapter_dir), dtype="fp32", device="cpu")
    llm = llama(base, out / "adapter.gguf")
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    same, diffs, first = 0, [], []
    for q in QUESTIONS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ours, theirs = torch_logits(model, ids)[-1], cpp_logits(llm, ids)[-1]
        diffs.append(float(np.abs(ours - theirs).max()))
        first.append(int(ours.argmax()) == int(theirs.argmax()))
        same += torch_greedy(model, ids, 20, stops) == cpp_greedy(llm, ids, 20, stops)
    report = {"case": "SmolLM2-135M-Instruct Q4_1 + trained adapter", "train_loss": res.get("train_loss"),
              "greedy_equal": f"{same}/{len(QUESTIONS)}", "first_token_equal": f"{sum(first)}/{len(QUESTIONS)}",
              "next_token_logit_diff_max": max(diffs), "next_token_logit_diff_median": float(np.median(diffs))}  # fmt: skip
    print(json.dumps(report))
    assert sum(first) >= 0.9 * len(QUESTIONS) and same >= 0.7 * len(QUESTIONS)
