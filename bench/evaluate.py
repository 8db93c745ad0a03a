"""One evaluator for every tool's adapter: `python -m bench.evaluate SPEC.json`.

The base model is loaded with transformers (fp32) and each adapter with PEFT's
`PeftModel.from_pretrained`, so no tool's own training code is involved. The loss is the
token-weighted cross-entropy over the assistant tokens of the held-out conversations (each reply's
content and its `<|end|>`, lorafit's mask). Conversations are not packed: batches of similar length,
right-padded, with an attention mask (padding changes nothing for the real tokens):

    eval_loss = sum over targets of -log p(token | prefix) / number of targets

The output head is applied to the target positions only (the other logits are never used).

SPEC: {"model": dir, "eval": jsonl, "adapters": {name: dir or null (the base model)}, "result": path}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def eval_loss(model, examples, batch_size: int = 8) -> tuple[float, int]:
    """Token-weighted CE over `examples` [(ids, labels)]; batched by length, right-padded, masked."""
    import torch
    import torch.nn.functional as F

    decoder = model.get_decoder()  # with PEFT, the base model's decoder with the LoRA layers in it
    head = model.get_output_embeddings()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[k : k + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, (x, y) in enumerate(batch):
                ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = x, y, 1
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            sel = labels.ne(-100)
            logits = head(hidden[sel]).float()
            total += float(F.cross_entropy(logits, labels[sel], reduction="sum"))
            n += int(sel.sum())
    return total / n, n


def main(argv: list[str] | None = None) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.data import load_conversations
    from lorafit.tokens import tokenize

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    tok = AutoTokenizer.from_pretrained(spec["model"])
    data, stats = tokenize(tok, load_conversations(spec["eval"]), max_seq_length=4096, end_of_turn="<|end|>")
    examples = []
    for i in range(len(data)):
        toks, sup = data.example(i)
        ids = torch.as_tensor(toks, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        sup_t = torch.as_tensor(sup)
        labels[:-1] = torch.where(
            sup_t[1:], ids[1:], torch.full_like(ids[1:], -100)
        )  # predict token t+1 at t
        examples.append((ids, labels))
    out = {}
    for name, adapter in spec["adapters"].items():
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        loss, n = eval_loss(model, examples)
        out[name] = {"eval_loss": loss, "targets": n, "seconds": round(time.perf_counter() - t, 1)}
        del model
    Path(spec["result"]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
