"""The hostile inputs of tests/test_guarantees.py, and what each must end in (run by tests/hostile.py).

A case is Case(argv, inputs, place, fix): `place` and `fix` are texts the one `error:` message must
hold (where the problem is: a file, a key, a flag; and what to do); `inputs` must be byte for byte the
same afterwards. Cases with `rc=0` are inputs lorafit accepts at a bounded cost (an enormous record is
clipped; chat goes on after a line that is not text). The tables (DATA_LINES, ADAPTER_CONFIGS) are
also used by tests/test_hostile_inputs.py at the library level.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PLANTED: list[Path] = []  # files planted by the cases that look like leftovers (a lock link)


@dataclass
class Case:
    argv: list[str]
    inputs: list[Path]  # files or folders that must be byte for byte the same afterwards
    place: str = ""  # the message names this (a path, a key, a flag)
    fix: str = "Fix:"  # and this (how to get past it)
    rc: int = 2
    stdin: str = ""  # lines typed into `chat`
    says: str = ""  # with rc=0: what stdout or stderr must hold


GOOD = {
    "messages": [{"role": "user", "content": "2: even or odd?"}, {"role": "assistant", "content": "even"}]
}
GOOD_LINE = json.dumps(GOOD)

# one bad line after a good one, for the data-reading commands: (line, place in the message, fix)
DATA_LINES = {
    "malformed-jsonl": ('{"messages": [{"role": "user"', "d.jsonl:2: malformed JSON", "Fix:"),
    "wrong-role": (
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        "d.jsonl:2",
        "Fix:",
    ),
    "no-assistant": (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "d.jsonl:2", "Fix:"),
    "deep-json": (
        "[" * 100_000 + "]" * 100_000,
        "d.jsonl:2: JSON nested too deeply to read",
        "flatten the record",
    ),
    "huge-int": (
        '{"prompt": "a", "completion": "b", "n": ' + "9" * 5000 + "}",
        "d.jsonl:2: unreadable JSON value",
        "give numbers of sensible size",
    ),
    "surrogate": (
        '{"prompt": "a \\ud800 b", "completion": "b"}',
        "d.jsonl:2: prompt has a lone surrogate code point (U+D800)",
        "Fix:",
    ),
}
# adapter_config.json edits: (change of the parsed config -> new file text, what the message says)
ADAPTER_CONFIGS = {
    "config-list": (lambda c: json.dumps([c]), "the top level is a list, not a JSON object"),
    "alpha-string": (
        lambda c: json.dumps({**c, "lora_alpha": "16"}),
        "lora_alpha is '16'; expected a finite number",
    ),
    "alpha-nan": (
        lambda c: json.dumps({**c, "lora_alpha": math.nan}),
        "lora_alpha is nan; expected a finite number",
    ),
    "rank-pattern": (
        lambda c: json.dumps({**c, "rank_pattern": {"o_proj": 2.5}}),
        "rank_pattern['o_proj'] is 2.5; expected a positive integer",
    ),
    "alpha-pattern-list": (
        lambda c: json.dumps({**c, "alpha_pattern": [1]}),
        "alpha_pattern is a list; expected an object {module name: value}",
    ),
    "r-zero": (lambda c: json.dumps({**c, "r": 0}), "r is 0; expected a positive integer"),
}
HUGE_LINE = 50_000_000  # characters of one assistant reply: the 50 MB line that once exhausted memory


def link_to_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


# ----------------------------------------------------------------------------- the inputs


def build_inputs(root: Path) -> dict[str, Path]:
    """The shared inputs: a tiny Phi-3, an adapter of it, an adapter of another size, good data."""
    from conftest import lorafit_model
    from safetensors.torch import save_file

    from lorafit import lora
    from lorafit.tiny import build_model, build_tokenizer, write_tiny_model

    root.mkdir(parents=True)
    base = write_tiny_model(root / "base")
    tok = build_tokenizer()
    adapter = lora.save_adapter(
        lorafit_model(build_model(tok, "demo"), ["qkv_proj", "o_proj"]), root / "adapter",
        base_model_name_or_path=str(base),
    )  # fmt: skip
    other = lora.save_adapter(  # an adapter of a model with other shapes, claiming to be for `base`
        lorafit_model(build_model(tok, "tiny"), ["qkv_proj", "o_proj"]), root / "other-adapter",
        base_model_name_or_path=str(base),
    )  # fmt: skip
    data = root / "good.jsonl"
    data.write_text((GOOD_LINE + "\n") * 8)
    config = root / "run.yaml"
    config.write_text("training_config:\n  max_steps: 1\n  max_seq_length: 64\n  eval_strategy: 'no'\n")

    def damaged(name: str, edit) -> Path:
        """A copy of the adapter with `edit(folder)` applied."""
        folder = root / name
        shutil.copytree(adapter, folder)
        edit(folder)
        return folder

    def cfg_edit(change):
        def edit(folder: Path) -> None:
            p = folder / "adapter_config.json"
            p.write_text(change(json.loads(p.read_text())))

        return edit

    def weights_edit(value):
        def edit(folder: Path) -> None:
            from safetensors.torch import load_file

            sd = load_file(folder / "adapter_model.safetensors")
            sd[sorted(sd)[0]][0, 0] = value
            save_file(sd, folder / "adapter_model.safetensors")

        return edit

    def truncate(folder: Path) -> None:
        p = folder / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def garbage(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)

    adapters = {
        f"adapter-{k}": damaged(f"a-{k}", cfg_edit(change)) for k, (change, _) in ADAPTER_CONFIGS.items()
    }
    adapters |= {
        "adapter-config-not-json": damaged("a-notjson", cfg_edit(lambda c: "{r: 4,")),
        "adapter-weights-nan": damaged("a-nan", weights_edit(math.nan)),
        "adapter-weights-inf": damaged("a-inf", weights_edit(math.inf)),
        "adapter-truncated-safetensors": damaged("a-trunc", truncate),
        "adapter-garbage-safetensors": damaged("a-garbage", garbage),
        "adapter-no-weights": damaged("a-noweights", lambda f: (f / "adapter_model.safetensors").unlink()),
        "adapter-config-link-to-dev-zero": damaged(
            "a-cfgzero", lambda f: link_to_zero(f / "adapter_config.json")
        ),
        "adapter-weights-link-to-dev-zero": damaged(
            "a-wzero", lambda f: link_to_zero(f / "adapter_model.safetensors")
        ),
        "adapter-mismatched-shapes": other,
    }
    return {"base": base, "adapter": adapter, "data": data, "config": config, **adapters}


# ----------------------------------------------------------------------------- the cases


@dataclass
class Where:
    """What every group of cases shares: the inputs, the folders, and the `train` argv."""

    root: Path
    inp: dict[str, Path]
    out: Path

    def __post_init__(self) -> None:
        self.base, self.adapter = self.inp["base"], self.inp["adapter"]
        self.good, self.config = self.inp["data"], self.inp["config"]

    def train(self, data, o, *extra) -> list[str]:
        return ["train", "--model", str(self.base), "--data", str(data), "--output-dir", str(o), "--no-progress",
                "--set", "training_config.max_steps=1", "--set", "training_config.max_seq_length=64",
                "--set", "training_config.eval_strategy=no", *extra]  # fmt: skip

    def d(self, name: str, text: str) -> Path:
        """root/in/NAME/d.jsonl holding `text`."""
        folder = self.root / "in" / name
        folder.mkdir()
        p = folder / "d.jsonl"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        return p


def build_cases(root: Path) -> dict[str, Case]:
    """Every case, with its inputs written under root/in and its outputs under root/out."""
    w = Where(root, build_inputs(root / "in"), root / "out")
    w.out.mkdir()
    return {**data_cases(w), **config_cases(w), **adapter_cases(w), **text_cases(w), **output_cases(w)}


def data_cases(w: Where) -> dict[str, Case]:
    """Data files, for every command that reads one: train, check-data, eval."""
    root, out, base, adapter, good, train, d = w.root, w.out, w.base, w.adapter, w.good, w.train, w.d
    cases: dict[str, Case] = {}
    for kind, (line, place, fix) in DATA_LINES.items():
        p = d(kind, GOOD_LINE + "\n" + line + "\n")
        cases[f"train/{kind}"] = Case(train(p, out / f"train-{kind}"), [p, base], place, fix)
        cases[f"check-data/{kind}"] = Case(
            ["check-data", "--model", str(base), "--data", str(p)], [p], place, fix
        )
        cases[f"eval/{kind}"] = Case(
            ["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(p)],
            [p, adapter],
            place,
            fix,
        )
    latin = root / "in" / "latin1"
    latin.mkdir()
    (latin / "d.jsonl").write_bytes(
        (GOOD_LINE + "\n").encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n'
    )
    for cmd in ("train", "check-data", "eval"):
        p = latin / "d.jsonl"
        argv = (
            train(p, out / "train-latin1")
            if cmd == "train"
            else [cmd, "--model", str(base), "--data", str(p)]
        )
        cases[f"{cmd}/not-utf8"] = Case(argv, [p], "d.jsonl:2: not valid UTF-8 (byte 0xe9", "iconv")
    specials = root / "in" / "special"
    specials.mkdir()
    os.mkfifo(specials / "fifo.jsonl")
    (specials / "zero.jsonl").symlink_to("/dev/zero")
    (specials / "empty.jsonl").write_text("")
    (specials / "dir.jsonl").mkdir()
    special = {
        "fifo": (specials / "fifo.jsonl", "is a FIFO (named pipe), not a regular file"),
        "link-to-dev-zero": (specials / "zero.jsonl", "is a device (it links to /dev/zero)"),
        "empty-file": (specials / "empty.jsonl", "the file is empty"),
        "directory": (specials / "dir.jsonl", "is a directory"),
    }
    sparse = root / "in" / "sparse"  # 257 MiB of zero bytes and no newline: one line, unless it is refused
    sparse.mkdir()
    with open(sparse / "d.jsonl", "wb") as f:
        f.truncate(257 << 20)
    for cmd in ("train", "check-data"):
        argv = train(sparse / "d.jsonl", out / "t-sparse") if cmd == "train" else [cmd, "--model", str(base), "--data",
                                                                                str(sparse / "d.jsonl")]  # fmt: skip
        cases[f"{cmd}/a-257MiB-line"] = Case(argv, [sparse], "d.jsonl:1: a line longer than 256 MiB", "Fix:")
    for kind, (p, place) in special.items():
        cases[f"train/{kind}"] = Case(train(p, out / f"train-{kind}"), [specials], place)
        cases[f"check-data/{kind}"] = Case(
            ["check-data", "--model", str(base), "--data", str(p)], [specials], place
        )
        cases[f"eval/{kind}"] = Case(["eval", "--model", str(base), "--data", str(p)], [specials], place)
    cases["train/eval-data-fifo"] = Case(
        train(good, out / "train-eval-fifo", "--eval-data", str(specials / "fifo.jsonl")), [specials, good],
        "fifo.jsonl: is a FIFO",
    )  # fmt: skip
    huge = d("huge", GOOD_LINE + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "tell"}, {"role": "assistant", "content": "ab " * (HUGE_LINE // 3)}]}) + "\n")  # fmt: skip
    cases["check-data/50MB-line-is-clipped"] = Case(
        ["check-data", "--model", str(base), "--data", str(huge), "--max-seq-length", "64", "--json"], [huge], rc=0,
        says='"clipped": 1',
    )  # fmt: skip
    cases["check-data/50MB-line-no-truncation"] = Case(
        ["check-data", "--model", str(base), "--data", str(huge), "--max-seq-length", "64", "--no-truncation"],
        [huge], "d.jsonl:2: more than 512 characters, far more than max_seq_length 64", "Fix:",
    )  # fmt: skip
    return cases


def config_cases(w: Where) -> dict[str, Case]:
    """Run configs (train): config files and --set values."""
    root, out, good, train = w.root, w.out, w.good, w.train
    cases: dict[str, Case] = {}

    def cfg(name: str, text: str) -> Path:
        p = root / "in" / name
        p.write_text(text)
        return p

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    configs = {
        "unknown-key": (cfg("unknown.yaml", "training_config:\n  learning_rat: 1e-4\n"), "learning_rat", "learning_rate"),
        "unknown-section": (cfg("section.yaml", "trainer:\n  max_steps: 1\n"), "trainer", "training_config"),
        "alias-bomb": (
            cfg("bomb.yaml", bomb + "peft_config:\n  target_modules: *i\n"), "bomb.yaml", "write the values out"
        ),
        "deep-yaml": (cfg("deep.yaml", "a: " + "[" * 1_500 + "]" * 1_500 + "\n"), "deep.yaml", "flatter"),
        "deep-json-config": (cfg("deep.json", "[" * 100_000 + "]" * 100_000), "deep.json", "Fix:"),
        "huge-int-yaml": (cfg("hugeint.yaml", "training_config:\n  seed: " + "9" * 5000 + "\n"), "hugeint.yaml", "4300 digits"),
        "seed-beyond-64-bits": (
            cfg("seed.yaml", f"training_config:\n  seed: {2**64}\n"), "training_config.seed",
            "expected an integer in [0, 18446744073709551615]",
        ),
        "negative-seed": (
            cfg("negseed.yaml", "training_config:\n  seed: -1\n"), "training_config.seed",
            "expected an integer in [0, 18446744073709551615]",
        ),
        "config-not-utf8": (cfg("latin.yaml", "x"), "latin.yaml: not a UTF-8 text file", "UTF-8"),
        "config-a-list": (cfg("list.yaml", "- 1\n- 2\n"), "list.yaml", "section"),
    }  # fmt: skip
    (root / "in" / "latin.yaml").write_bytes(b"training_config:\n  output_dir: caf\xe9\n")
    os.mkfifo(root / "in" / "fifo.yaml")
    (root / "in" / "zero.yaml").symlink_to("/dev/zero")
    configs["fifo"] = (root / "in" / "fifo.yaml", "fifo.yaml: is a FIFO", "Fix:")
    configs["link-to-dev-zero"] = (root / "in" / "zero.yaml", "zero.yaml: is a device", "Fix:")
    for kind, (p, place, fix) in configs.items():
        cases[f"train/config-{kind}"] = Case(
            train(good, out / f"cfg-{kind}", "--config", str(p)), [p, good], place, fix
        )
    for kind, (value, fix) in {
        "seed-beyond-64-bits": (str(2**64), "expected an integer in [0, 18446744073709551615]"),
        "seed-5000-digits": ("9" * 5000, "4300 digits"),
        "alias-bomb": ("&a [*a]", "valid YAML"),
    }.items():
        cases[f"train/set-{kind}"] = Case(
            train(good, out / f"set-{kind}", "--set", f"training_config.seed={value}"),
            [good],
            "training_config.seed",
            fix,
        )
    return cases


def adapter_cases(w: Where) -> dict[str, Case]:
    """Damaged adapters, for every command that reads one: eval, generate, chat, fuse, export, train --adapter."""
    inp, out, base, good, train = w.inp, w.out, w.base, w.good, w.train
    cases: dict[str, Case] = {}
    messages = {f"adapter-{k}": (f"a-{k}/adapter_config.json: {m}", "Fix: correct adapter_config.json")
                for k, (_, m) in ADAPTER_CONFIGS.items()}  # fmt: skip
    messages |= {
        "adapter-config-not-json": ("a-notjson/adapter_config.json: not valid JSON", "Fix:"),
        "adapter-weights-nan": ("a-nan/adapter_model.safetensors: tensor", "Fix: use an earlier checkpoint"),
        "adapter-weights-inf": ("a-inf/adapter_model.safetensors: tensor", "Fix: use an earlier checkpoint"),
        "adapter-truncated-safetensors": ("a-trunc/adapter_model.safetensors: corrupt or truncated", "Fix:"),
        "adapter-garbage-safetensors": ("a-garbage/adapter_model.safetensors: corrupt or truncated", "Fix:"),
        "adapter-no-weights": ("a-noweights: missing adapter_model.safetensors", "Fix:"),
        "adapter-config-link-to-dev-zero": ("a-cfgzero/adapter_config.json: is a device", "Fix:"),
        "adapter-weights-link-to-dev-zero": ("a-wzero/adapter_model.safetensors: is a device", "Fix:"),
        "adapter-mismatched-shapes": ("other-adapter", "Fix:"),
    }
    for kind, (place, fix) in messages.items():
        a = inp[kind]
        with_base = ["--model", str(base), "--adapter", str(a)]
        argvs = {
            "eval": ["eval", *with_base, "--data", str(good)],
            "generate": ["generate", *with_base, "--prompt", "hi", "--max-new-tokens", "2"],
            "chat": ["chat", *with_base, "--max-new-tokens", "2"],
            "fuse": ["fuse", *with_base, "--output-dir", str(out / f"fuse-{kind}")],
            "export": [
                "export",
                "--adapter",
                str(a),
                "--output-dir",
                str(out / f"export-{kind}"),
                "--layout",
                "split",
                "--base-model",
                str(base),
            ],  # fmt: skip
            "train": train(good, out / f"train-{kind}", "--adapter", str(a)),
        }
        for cmd, argv in argvs.items():
            cases[f"{cmd}/{kind}"] = Case(argv, [a, base, good], place, fix, stdin="hi\n/exit\n")
    return cases


def text_cases(w: Where) -> dict[str, Case]:
    """generate and chat: flags and text."""
    root, inp, base = w.root, w.inp, w.base
    cases: dict[str, Case] = {}
    gen = ["generate", "--model", str(base), "--device", "cpu"]
    for value in ("0", "-1", "many"):
        cases[f"generate/max-new-tokens-{value}"] = Case(
            [*gen, "--prompt", "hi", "--max-new-tokens", value], [base], "--max-new-tokens", "at least 1"
            if value != "many" else "not an integer"
        )  # fmt: skip
        cases[f"chat/max-new-tokens-{value}"] = Case(
            ["chat", "--model", str(base), "--max-new-tokens", value], [base], "--max-new-tokens",
            "at least 1" if value != "many" else "not an integer",
        )  # fmt: skip
    cases["generate/prompt-beyond-the-context"] = Case(
        [*gen, "--prompt", "x y " * 4200], [base], "max_position_embeddings", "Fix: shorten the prompt"
    )
    cases["generate/prompt-not-utf8"] = Case(
        [*gen, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], [base], "at position 3 (U+DCE9",
        "as UTF-8 text",
    )  # fmt: skip
    cases["generate/system-not-utf8"] = Case(
        [*gen, "--prompt", "hi", "--system", b"\xff".decode("utf-8", "surrogateescape")],
        [base],
        "U+DCFF",
        "UTF-8",
    )
    cases["chat/a-line-not-utf8-goes-on"] = Case(
        ["chat", "--model", str(base), "--max-new-tokens", "2"], [base], rc=0,
        stdin=b"\xff\xfe\n".decode("utf-8", "surrogateescape") + "/exit\n",
        says="error: the user text (message 0) has a character that is not text",
    )  # fmt: skip
    cases["generate/missing-model"] = Case(
        [*gen, "--prompt", "hi", "--model", str(root / "in" / "nope")], [], "nope"
    )
    cases["generate/model-folder-of-garbage"] = Case(
        [*gen, "--prompt", "hi", "--model", str(inp["adapter-garbage-safetensors"])], [inp["adapter-garbage-safetensors"]],
        "a-garbage",
    )  # fmt: skip
    return cases


def output_cases(w: Where) -> dict[str, Case]:
    """Output folders: never an input (under any flag), never written through a planted link."""
    root, out, base, adapter, good, config, train = (
        w.root,
        w.out,
        w.base,
        w.adapter,
        w.good,
        w.config,
        w.train,
    )
    cases: dict[str, Case] = {}

    def run_dir(name: str, *files: str) -> Path:
        o = out / name
        o.mkdir()
        for f in files:
            (o / f).write_text("{}\n")
        return o

    victim = root / "in" / "victim.txt"
    victim.write_text("precious\n")
    lock = run_dir("planted-lock") / ".lorafit.lock"
    lock.symlink_to(victim)
    PLANTED.append(lock)
    cases["train/planted-lock-link"] = Case(train(good, lock.parent), [victim, good], ".lorafit.lock")
    metrics = run_dir("planted-metrics") / "metrics.jsonl"
    metrics.symlink_to(victim)
    cases["train/planted-metrics-link"] = Case(train(good, metrics.parent), [victim, good], "metrics.jsonl")

    link_out = out / "link-out"
    link_out.symlink_to(base, target_is_directory=True)
    for cmd, argv in {
        "fuse": [
            "fuse",
            "--model",
            str(base),
            "--adapter",
            str(adapter),
            "--output-dir",
            str(link_out),
            "--overwrite",
        ],
        "export": ["export", "--adapter", str(adapter), "--output-dir", str(link_out), "--overwrite"],
        "tiny-model": ["tiny-model", str(link_out)],
    }.items():
        cases[f"{cmd}/output-dir-a-link"] = Case(argv, [base, adapter], "symbolic link", "Fix:")
    for flag in ("", "--overwrite", "--resume"):
        extra = [flag] if flag else []
        cases[f"train/output-dir-is-the-base{flag}"] = Case(
            train(good, base, *extra), [base, good], "holds the input"
        )
        cases[f"train/data-in-output-dir{flag}"] = Case(
            train(base / "config.json", base, *extra), [base], "holds the input"
        )
    in_out = run_dir("data-in-out")
    shutil.copy(good, in_out / "metrics.jsonl")  # the data sits where a run writes its log
    run = run_dir("user-run", "results.json")  # what `lorafit train` leaves: an adapter with results
    shutil.copytree(adapter, run, dirs_exist_ok=True)
    other = run_dir("other-adapter")  # not this command's input, but an adapter: never a fuse output
    shutil.copytree(adapter, other, dirs_exist_ok=True)
    own_cfg = run_dir("own-config")
    (own_cfg / "config.yaml").write_text(config.read_text())
    fuse = ["fuse", "--model", str(base), "--adapter", str(adapter), "--output-dir"]
    export = ["export", "--adapter", str(adapter), "--output-dir"]
    for flag in ("", "--overwrite", "--resume"):
        extra = [flag] if flag else []
        cases[f"train/data-is-OUT-metrics.jsonl{flag}"] = Case(
            train(in_out / "metrics.jsonl", in_out, *extra), [in_out], "holds the input"
        )
        if flag == "--resume":
            continue
        cases[f"train/config-is-OUT-config.yaml{flag}"] = Case(
            ["train", "--model", str(base), "--data", str(good), "--output-dir", str(own_cfg), "--no-progress",
             "--config", str(own_cfg / "config.yaml"), *extra], [own_cfg, good], "config.yaml", "copy it elsewhere",
        )  # fmt: skip
        onto = {  # command/target: (argv, inputs, what the message names)
            "export/onto-the-base": ([*export, str(base)], [base, adapter], str(base)),
            "export/onto-the-base-given-as-base": (
                [*export, str(base), "--base-model", str(base)],
                [base],
                str(base),
            ),
            "export/onto-its-adapter": ([*export, str(adapter)], [adapter], str(adapter)),
            "export/onto-a-training-run": ([*export, str(run)], [adapter, run], str(run)),
            "fuse/onto-the-base": ([*fuse, str(base)], [base, adapter], str(base)),
            "fuse/onto-its-adapter": ([*fuse, str(adapter)], [base, adapter], str(adapter)),
            "fuse/onto-a-training-run": ([*fuse, str(run)], [base, adapter, run], str(run)),
            "fuse/onto-another-adapter": ([*fuse, str(other)], [base, adapter, other], str(other)),
        }
        for name, (argv, inputs, place) in onto.items():
            cases[name + flag] = Case(argv + extra, inputs, place)
    cases["train/adapter-is-the-output-dir--overwrite"] = Case(
        train(good, run, "--adapter", str(run), "--overwrite"), [run, good], "holds the input"
    )
    cases["train/config-is-OUT-results.json--overwrite"] = Case(
        train(good, run, "--config", str(run / "results.json"), "--overwrite"), [run, good], "holds the input"
    )
    cases["tiny-model/onto-an-adapter"] = Case(["tiny-model", str(adapter)], [adapter], str(adapter))
    cases["tiny-model/onto-a-training-run"] = Case(["tiny-model", str(run)], [run], str(run))
    cases["tiny-model/onto-a-file"] = Case(["tiny-model", str(good)], [good], str(good))
    cases["demo/onto-a-training-run"] = Case(
        ["demo", "--output-dir", str(run), "--no-progress"], [run], str(run)
    )
    demo = run_dir("demo-with-a-user-run")
    shutil.copytree(run, demo / "adapter")
    cases["demo/onto-a-user-run-in-OUT-adapter"] = Case(
        ["demo", "--output-dir", str(demo), "--no-progress"], [demo], str(demo / "adapter")
    )
    return cases
