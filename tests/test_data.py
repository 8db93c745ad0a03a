"""Tests for lorafit.data and lorafit.packing: reading, validation, loss mask, tokenized data, packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import lora_grads, write_jsonl

from lorafit.attention import PACKED_SDPA, segment_kwargs, use_packed_sdpa
from lorafit.data import Conversation, load_conversations, split_eval
from lorafit.errors import DataError
from lorafit.packing import Batches, collate, pack, single_rows
from lorafit.tiny import build_model, build_tokenizer
from lorafit.tokens import encode, tokenize

EOT = "<|end|>"


def chat(*pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in pairs:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


def error_of(path, records):
    write_jsonl(path, *records)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    return str(e.value)


GOOD = {"messages": chat(("Hi", "Hello"))}


# ---------------------------------------------------------------------------------------------
# The loss mask


def test_mask_is_exactly_assistant_content_and_end(tok):
    messages = chat(("Hi there", "Hello!"), ("2+2?", "4, of course."), system="Be brief.")
    ids, sup = encode(tok, messages, end_of_turn=EOT)

    # Expected mask, built independently from Phi-3's format piece by piece.
    exp_ids, exp_sup = [], []

    def piece(text, supervised):
        t = tok(text, add_special_tokens=False)["input_ids"]
        exp_ids.extend(t)
        exp_sup.extend([supervised] * len(t))

    for m in messages:
        piece(f"<|{m['role']}|>\n", False)
        piece(m["content"], m["role"] == "assistant")
        piece("<|end|>", m["role"] == "assistant")
        piece("\n", False)
    piece("<|endoftext|>", False)

    assert ids == exp_ids
    assert sup == exp_sup
    # The same tokens as generation-time tokenization.
    assert ids == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    supervised_text = tok.decode([i for i, s in zip(ids, sup) if s])
    assert supervised_text == "Hello!<|end|>4, of course.<|end|>"
    assert sum(sup) == len("Hello!") + len("4, of course.") + 2


def test_train_on_all(tok):
    ids, sup = encode(tok, chat(("Hi", "Yo")), end_of_turn=EOT, train_on="all")
    assert all(sup) and len(sup) == len(ids)


def test_stripping_template_and_wrong_end_of_turn(tok):
    tok2 = build_tokenizer()
    tok2.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    ids, sup = encode(tok2, chat(("Hi", "  Hello  ")), end_of_turn=EOT)
    assert tok2.decode([i for i, s in zip(ids, sup) if s]) == "Hello<|end|>"
    with pytest.raises(DataError, match="end_of_turn '<eot>' does not follow"):
        encode(tok, chat(("Hi", "Yo")), end_of_turn="<eot>")
    ids, sup = encode(tok, chat(("Hi", "Yo")), end_of_turn="")
    assert tok.decode([i for i, s in zip(ids, sup) if s]) == "Yo"


def test_layouts_give_the_same_tokens(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        *[
            {"messages": chat(("Do it\n\nnow", "Done")), "prompt_id": "abc"},
            {"prompt": "Do it\n\nnow", "completion": "Done"},
            {"instruction": "Do it", "input": "now", "output": "Done"},
            {
                "prompt": [{"role": "user", "content": "Do it\n\nnow"}],
                "completion": [{"role": "assistant", "content": "Done"}],
            },
            {"instruction": "Do it\n\nnow", "input": "", "output": "Done"},
        ],
    )
    convs = load_conversations(path)
    assert [c.location for c in convs] == [f"{path}:{i}" for i in range(1, 6)]
    encoded = [encode(tok, c.messages, end_of_turn=EOT) for c in convs]
    assert all(e == encoded[0] for e in encoded)
    assert convs[0].messages == chat(("Do it\n\nnow", "Done"))


# ---------------------------------------------------------------------------------------------
# Sources and validation


def test_json_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": chat(("Hi", "Hello"))}, {"messages": chat(("A", "B"), system="S")}]
    jpath = tmp_path / "d.json"
    jpath.write_text(json.dumps(records), encoding="utf-8")
    ppath = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), ppath)
    for path in (jpath, ppath, str(ppath)):
        convs = load_conversations(path)
        assert [c.messages for c in convs] == [r["messages"] for r in records]
        assert convs[1].location == f"{path}:record 1"

    bad = [{"messages": chat(("Hi", "Hello"))}, {"messages": [{"role": "user", "content": "x"}]}]
    pq.write_table(pa.Table.from_pylist(bad), ppath)
    with pytest.raises(DataError, match=r"d\.parquet:record 1: no assistant turn"):
        load_conversations(ppath)
    jpath.write_text(json.dumps({"data": records}), encoding="utf-8")
    with pytest.raises(DataError, match="not a list of records.*JSON list"):
        load_conversations(jpath)
    jpath.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:2: malformed JSON.*rename the file to \.jsonl"):
        load_conversations(jpath)


def test_malformed_json_line(tmp_path):
    msg = error_of(tmp_path / "d.jsonl", [GOOD, '{"messages": [}', GOOD])
    assert f"{tmp_path / 'd.jsonl'}:2: malformed JSON" in msg
    assert "1 problem in 1 record" in msg and "one complete JSON object" in msg


def test_unrecognized_layout(tmp_path):
    msg = error_of(tmp_path / "d.jsonl", [GOOD, {"text": "hello"}])
    assert "d.jsonl:2: no recognized layout (keys: 'text')" in msg
    assert '{"prompt": "...", "completion": "..."}' in msg and '"instruction"' in msg


def test_unknown_role(tmp_path):
    msg = error_of(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "gpt", "content": "y"}]}],
    )
    assert (
        "d.jsonl:1: messages[1] has unknown role 'gpt' (use 'assistant'); valid roles: system, user, assistant"
        in msg
    )
    assert "no assistant turn" not in msg  # one mistake, one message


def test_empty_content(tmp_path):
    msg = error_of(tmp_path / "d.jsonl", [{"messages": chat(("Hi", "   "))}])
    assert "d.jsonl:1: messages[1] content is empty; give it text or remove it" in msg


def test_no_assistant_turn(tmp_path):
    msg = error_of(tmp_path / "d.jsonl", [GOOD, GOOD, {"messages": [{"role": "user", "content": "Hi"}]}])
    assert "d.jsonl:3: no assistant turn" in msg and "add an assistant reply" in msg


def test_other_record_problems(tmp_path):
    msg = error_of(
        tmp_path / "d.jsonl",
        [
            {"messages": "Hi"},
            {"messages": [*chat(("Hi", "Yo")), {"role": "system", "content": "late"}]},
            {"messages": ["Hi", {"role": "assistant", "content": 3}]},
            [1, 2],
            {"prompt": "Hi"},
        ],
    )
    assert "d.jsonl:1: 'messages' is a string, not a list" in msg
    assert (
        "d.jsonl:2: messages[2] is a system message after the first turn; a system message may only come first"
        in msg
    )
    assert "d.jsonl:3: messages[0] is a string, not an object" in msg
    assert "d.jsonl:3: messages[1] content is a number, not a string" in msg
    assert "d.jsonl:4: is a list, not a JSON object" in msg
    assert "d.jsonl:5: has 'prompt' but no 'completion'" in msg


def test_many_bad_lines_reported_together(tmp_path):
    records = [GOOD if i % 3 == 0 else '{"messages": ' for i in range(60)] + [{"messages": chat(("", ""))}]
    msg = error_of(tmp_path / "d.jsonl", records)
    lines = msg.splitlines()
    assert lines[0] == f"{tmp_path / 'd.jsonl'}: 42 problems in 41 records:"
    assert len([ln for ln in lines if "malformed JSON" in ln]) == 20
    assert "  ... and 22 more problems (41 records affected)" in lines
    assert lines[-1].startswith("Fix: ")


def test_file_level_errors(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 .*re-save the file as UTF-8"):
        load_conversations(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty. Fix: point to a file"):
        load_conversations(empty)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file. Fix: check the path"):
        load_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"no such file"):
        load_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a directory. Fix"):
        load_conversations(tmp_path)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type '.csv'"):
        load_conversations(tmp_path / "d.csv")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="contains no records"):
        load_conversations(tmp_path / "none.json")


def test_hub_id_without_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="taken as a Hugging Face dataset id.*pip install datasets"):
            load_conversations("HuggingFaceH4/ultrachat_200k", split="train_sft")
    else:
        pytest.skip("datasets is installed")


def test_split_eval():
    convs = [Conversation(chat(("q", "a")), f"f:{i}") for i in range(10)]
    train, ev = split_eval(convs, 0.2, seed=3)
    assert len(ev) == 2 and len(train) == 8
    assert sorted(c.location for c in train + ev) == sorted(c.location for c in convs)
    assert split_eval(convs, 0.2, seed=3) == (train, ev)
    assert split_eval(convs, 0.2, seed=4)[1] != ev
    assert len(split_eval(convs[:2], 0.01, seed=0)[1]) == 1
    assert split_eval(convs, 0.0, seed=0) == (convs, [])
    assert split_eval(convs[:1], 0.5, seed=0) == (convs[:1], [])


# ---------------------------------------------------------------------------------------------
# Tokenized data


def convs_of(*messages):
    return [Conversation(m, f"t.jsonl:{i + 1}") for i, m in enumerate(messages)]


def test_truncation_and_dropping(tok):
    long = chat(("Hi", "x" * 50))
    late = chat(("q" * 40, "answer"))
    convs = convs_of(chat(("Hi", "Yo")), long, late)
    data, stats = tokenize(tok, convs, max_seq_length=30, end_of_turn=EOT)
    assert (stats.conversations, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert data.sources == ["t.jsonl:1", "t.jsonl:2"]
    assert list(data.lengths) == [len(encode(tok, convs[0].messages, end_of_turn=EOT)[0]), 30]
    assert stats.max_len == 30 and stats.tokens == int(data.lengths.sum())
    assert stats.supervised_tokens == int(data.supervised.sum()) == 3 + (30 - 8)
    assert sum(c for _, _, c in stats.histogram(4)) == 2
    assert json.loads(json.dumps(stats.to_dict()))["truncated"] == 2

    with pytest.raises(DataError) as e:
        tokenize(tok, convs, max_seq_length=30, end_of_turn=EOT, truncation=False)
    msg = str(e.value)
    assert "t.jsonl:2: 61 tokens > max_seq_length 30" in msg and "t.jsonl:3: " in msg
    assert "2 problems in 2 records" in msg and "raise max_seq_length" in msg


# ---------------------------------------------------------------------------------------------
# Packing, collate, batches


@pytest.fixture(scope="module")
def dataset(tok):
    rng = np.random.default_rng(0)
    convs = []
    for i in range(40):
        pairs = [("q" * int(rng.integers(1, 20)), "a" * int(rng.integers(1, 20))) for _ in range(1 + i % 3)]
        convs.append(chat(*pairs, system="sys" if i % 2 else None))
    return tokenize(tok, convs_of(*convs), max_seq_length=128, end_of_turn=EOT, train_on="all")


def test_pack_fits_and_covers(dataset):
    data, _ = dataset
    rows = pack(data, 128)
    assert sorted(i for r in rows for i in r) == list(range(len(data)))
    assert all(sum(int(data.lengths[i]) for i in r) <= 128 for r in rows)
    assert len(rows) < len(data) and rows == pack(data, 128)
    assert single_rows(data) == [[i] for i in range(len(data))]
    with pytest.raises(DataError, match="more than max_seq_length"):
        pack(data, 10)


def test_collate_labels_positions_targets(dataset):
    data, stats = dataset
    rows = pack(data, 128)
    batch = collate(data, rows[:3], pad_id=0, pad_to=130)
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    assert ids.shape == pos.shape == labels.shape == (3, 130) and ids.dtype == torch.long
    for b, row in enumerate(rows[:3]):
        cur = 0
        for i in row:
            toks, _ = data.example(i)
            n = len(toks)
            assert ids[b, cur : cur + n].tolist() == toks.tolist()
            assert pos[b, cur : cur + n].tolist() == list(range(n))
            assert labels[b, cur : cur + n - 1].tolist() == toks[1:].tolist()  # train_on="all"
            assert labels[b, cur + n - 1] == -100  # the boundary: nothing predicts the next example
            cur += n
        assert (ids[b, cur:] == 0).all() and (labels[b, cur:] == -100).all()
        assert pos[b, cur:].tolist() == list(range(130 - cur))
    # num_targets over an epoch = supervised tokens minus each example's first token.
    total = sum(collate(data, rows[k : k + 4], pad_id=0)["num_targets"] for k in range(0, len(rows), 4))
    first = int(sum(data.supervised[o] for o in data.offsets[:-1]))
    assert total == int(data.supervised.sum()) - first == stats.targets == stats.tokens - len(data)
    assert stats.supervised_tokens == stats.tokens


def test_collate_assistant_mask(tok):
    data, stats = tokenize(
        tok, convs_of(chat(("Hi", "Yo")), chat(("A", "Bc"))), max_seq_length=64, end_of_turn=EOT
    )
    batch = collate(data, [[0, 1]], pad_id=0)
    got = [tok.convert_ids_to_tokens(int(t)) for t in batch["labels"][0] if t != -100]
    assert got == ["Y", "o", EOT, "B", "c", EOT]
    assert batch["num_targets"] == stats.targets == 6


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_row_matches_separate_runs(tok, attn):
    model = build_model(tok).eval()
    if attn == PACKED_SDPA:
        assert use_packed_sdpa(model)
    else:
        model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    convs = convs_of(
        chat(("Hi there", "Hello, friend."), system="Be kind."),
        chat(("2+2?", "4"), ("and 3+3?", "6")),
        chat(("Name a color", "Blue")),
    )
    data, _ = tokenize(tok, convs, max_seq_length=256, end_of_turn=EOT)
    batch = collate(data, [[0, 1, 2], [1]], pad_id=tok.pad_token_id)
    lengths = [len(data.example(i)[0]) for i in range(3)]
    assert batch["segments"] == [lengths, [lengths[1], sum(lengths) - lengths[1]]]  # row 2: example, padding
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
            **segment_kwargs(model, batch),
        ).logits  # fmt: skip
        cur = 0
        for i in range(3):
            toks, _ = data.example(i)
            alone = model(input_ids=torch.as_tensor(toks, dtype=torch.long)[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[0, cur : cur + len(toks)], alone, atol=1e-5, rtol=1e-5)
            cur += len(toks)
        n1 = len(data.example(1)[0])
        alone1 = model(
            input_ids=torch.as_tensor(data.example(1)[0], dtype=torch.long)[None], use_cache=False
        ).logits[0]
        torch.testing.assert_close(packed[1, :n1], alone1, atol=1e-5, rtol=1e-5)  # padded row
        # Control: without restarting positions the examples do see each other.
        flat = torch.arange(batch["input_ids"].shape[1])[None].expand(2, -1)
        leaky = model(input_ids=batch["input_ids"], position_ids=flat, use_cache=False).logits
        assert not torch.allclose(leaky[0, cur - 5 : cur], packed[0, cur - 5 : cur], atol=1e-3)


def test_per_conversation_attention_gives_the_masked_gradients(tok):
    """lorafit_sdpa (attention per packed conversation) vs sdpa's block-diagonal mask: same loss and
    LoRA gradients, here with grouped-query attention (fewer k/v heads) too."""
    convs = convs_of(*(chat((f"q{i} " * (i + 1), f"answer {i} " * (2 * i + 1))) for i in range(6)))
    data, _ = tokenize(tok, convs, max_seq_length=256, end_of_turn=EOT)
    batch = collate(data, [[0, 1, 2], [3, 4], [5]], pad_id=tok.pad_token_id)
    grads = {}
    for attn in ("sdpa", PACKED_SDPA):
        grads[attn] = lora_grads(tok, batch, attn, num_key_value_heads=2)  # the same LoRA weights for both
    (l0, g0), (l1, g1) = grads.values()
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert (
        g0.keys() == g1.keys() and len(g0) == 4 * build_model(tok).config.num_hidden_layers
    )  # A, B of 2 modules
    for n in g0:
        scale = float(g0[n].abs().max())  # fp32 sums in another order: relative to the gradient's size
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_batches_deterministic_sharded():
    rows = [[i] for i in range(23)]
    b = Batches(rows, 3, seed=7)
    assert b.batches_per_epoch == len(b) == 8
    e0 = b.epoch_batches(0)
    assert e0 == Batches(rows, 3, seed=7).epoch_batches(0)
    assert e0 != b.epoch_batches(1)
    assert sorted(r[0] for batch in e0 for r in batch) == list(range(23))
    assert [len(x) for x in e0] == [3] * 7 + [2]
    assert [[r[0] for r in x] for x in Batches(rows, 3, seed=0, shuffle=False).epoch_batches(5)][:2] == [
        [0, 1, 2],
        [3, 4, 5],
    ]
    assert Batches(rows, 3, seed=7, drop_last=True).batches_per_epoch == 7

    state = np.random.get_state()
    shards = [Batches(rows, 2, seed=1, rank=r, world_size=3).epoch_batches(4) for r in range(3)]
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert {len(s) for s in shards} == {4}  # 12 batches -> 4 per rank
    seen = [r[0] for s in shards for batch in s for r in batch]
    assert len(seen) == len(set(seen)) == 23  # disjoint and covering (the 12th batch holds one row)
    shards5 = [Batches(rows, 2, seed=1, rank=r, world_size=5).epoch_batches(0) for r in range(5)]
    seen5 = [r[0] for s in shards5 for batch in s for r in batch]
    assert {len(s) for s in shards5} == {2} and len(seen5) == len(set(seen5)) == 20  # 2 batches skipped
    with pytest.raises(DataError, match="lower batch_size"):
        Batches(rows[:2], 4, seed=0, world_size=2)
