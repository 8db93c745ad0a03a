"""lorafit's Python API: one function per CLI subcommand.

    import lorafit
    results = lorafit.finetune(
        model="microsoft/Phi-3-mini-4k-instruct", train_data="train.jsonl", eval_data="eval.jsonl",
        training_config={"learning_rate": 2e-4, "num_train_epochs": 1, "output_dir": "out"},
        peft_config={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    )
    model, tokenizer = lorafit.load("microsoft/Phi-3-mini-4k-instruct", adapter="out")
    print(lorafit.generate(model, tokenizer, "Hello!"))

Heavy imports (transformers) happen inside the functions, so `import lorafit as lora` stays a
light import for users of the layer library.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from lorafit.precision import mixed_precision  # torch only: cheap

# The pipeline modules are imported inside each function (an entry point): `import lorafit` stays light.


def _section(value) -> dict | None:
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    return dict(value)


def build_config(
    *,
    model: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    training_config: Any = None,
    peft_config: Any = None,
    output_dir: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | tuple = (),
    adapter: str | Path | None = None,
    source: str | None = None,
):
    """Resolve a RunConfig: defaults < config file < arguments < overrides ("section.key=value").

    `source` names where the arguments came from in errors and warnings ("command line" for the CLI);
    None names each by its argument, e.g. "finetune(training_config=...)".
    """
    from lorafit.config import load_config

    base: dict = {"model": {}, "data": {}, "training_config": _section(training_config) or {},
                  "peft_config": _section(peft_config) or {}}  # fmt: skip
    if isinstance(model, (str, Path)):
        base["model"]["name_or_path"] = str(model)
    if adapter is not None:
        base["model"]["adapter"] = str(adapter)
    if train_data is not None:
        base["data"]["train"] = str(train_data)
    if eval_data is not None:
        base["data"]["eval"] = str(eval_data)
    if output_dir is not None:
        base["training_config"]["output_dir"] = str(output_dir)
    labels = source or {
        "model": "finetune(model=...)",
        "model.adapter": "finetune(adapter=...)",
        "data.train": "finetune(train_data=...)",
        "data.eval": "finetune(eval_data=...)",
        "training_config": "finetune(training_config=...)",
        "training_config.output_dir": "finetune(output_dir=...)" if output_dir is not None
        else "finetune(training_config=...)",
        "peft_config": "finetune(peft_config=...)",
    }  # fmt: skip
    return load_config(config, overrides=list(overrides), base=base, base_origin=labels)


def finetune(
    model: Any = None,
    train_data: str | Path | None = None,
    eval_data: str | Path | None = None,
    training_config: dict | None = None,
    peft_config: dict | None = None,
    *,
    output_dir: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | tuple = (),
    tokenizer: Any = None,
    resume: bool | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    adapter: str | Path | None = None,
    source: str | None = None,
) -> dict:
    """Fine-tune `model` with LoRA on `train_data`; returns the results (also in OUT/results.json).

    `model` is a hub id or local folder (or an already loaded transformers model, with `tokenizer`).
    `training_config` / `peft_config` are the guide's two dicts (Hugging Face TrainingArguments and
    PEFT LoraConfig names). `resume=True` continues from the newest checkpoint in the output
    directory; `overwrite=True` replaces a previous run there. Precedence: defaults < `config` file <
    the other arguments < `overrides`. Errors and warnings name an argument's value by the argument
    ("finetune(training_config=...): training_config.do_eval is ignored: ..."), or by `source` when given
    (the CLI passes "command line").

    `adapter` (config key `model.adapter`) trains an existing adapter further: a PEFT or lorafit adapter
    folder (stacked or split keys, slice adapters) or a loralib export. Its LoRA shape (ranks, alphas,
    rank_pattern/alpha_pattern, rsLoRA, target modules) is used; a peft_config value set to something
    else than the default that disagrees with it is an error (lorafit.adapters.continue_lora). Its base
    must fit the model. The optimizer and the learning-rate schedule start fresh (step 0).
    """
    from lorafit.config import ConfigWarning
    from lorafit.distributed import env_rank
    from lorafit.job import prepare
    from lorafit.train import run

    with warnings.catch_warnings():
        if env_rank() != 0:  # under torchrun every rank reads the same config: rank 0 warns for all
            warnings.simplefilter("ignore", ConfigWarning)
        cfg = build_config(
            model=model, train_data=train_data, eval_data=eval_data, training_config=training_config,
            peft_config=peft_config, output_dir=output_dir, config=config, overrides=overrides,
            adapter=adapter, source=source,
        )  # fmt: skip
    loaded = None if isinstance(model, (str, Path)) or model is None else model
    if loaded is not None and tokenizer is None:
        from lorafit.errors import ConfigError

        raise ConfigError("finetune(model=<loaded model>) also needs tokenizer=<its tokenizer>")
    if loaded is not None and getattr(loaded.config, "_name_or_path", None):
        cfg.model.name_or_path = loaded.config._name_or_path
    job = prepare(
        cfg, model=loaded, tokenizer=tokenizer, resume=resume, overwrite=overwrite, config_file=config
    )
    return run(job, progress=progress)


def estimate(
    model: Any = None,
    train_data: str | Path | None = None,
    eval_data: str | Path | None = None,
    training_config: dict | None = None,
    peft_config: dict | None = None,
    *,
    output_dir: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | tuple = (),
    adapter: str | Path | None = None,
    processes: int | None = None,
    free_memory: int | None = None,
    probe: int = 0,
    source: str | None = None,
):
    """What `finetune` with the same arguments would need, without loading the weights: a
    `lorafit.memory.Plan` (`.to_dict()`: the figures, `peak_memory_bytes` the peak per device; `.report()`:
    the text `lorafit estimate` prints; `.fits`: True, False, or None when the free memory is unknown).

    From the model's config (built on the meta device, LoRA on it) and the data's token counts (tokenizer
    only). `processes`: plan for N processes (default: 1, or the torchrun world size); with
    training_config.fsdp the figures are per rank. `free_memory`: check the peak against this many bytes
    instead of the device's free memory (to plan for another machine). `probe`: also train this many steps
    on the real model (weights loaded, nothing written but a temporary folder) and estimate the run's time
    from the measured tokens/s (`.probe`)."""
    from lorafit.distributed import env_world_size
    from lorafit.job import plan

    cfg = build_config(
        model=model, train_data=train_data, eval_data=eval_data, training_config=training_config,
        peft_config=peft_config, output_dir=output_dir, config=config, overrides=overrides, adapter=adapter,
        source=source,
    )  # fmt: skip
    try:
        result = plan(cfg, processes=processes or env_world_size(), free=free_memory)
    except (
        AttributeError,
        TypeError,
        NotImplementedError,
    ) as e:  # a config without the sizes the estimate reads
        from lorafit.errors import LorafitError

        raise LorafitError(
            f"cannot estimate the memory of {cfg.model.name_or_path!r}: {type(e).__name__}: {e}. lorafit estimate "
            "reads a decoder-only model's config (hidden_size, num_hidden_layers, vocab_size); `lorafit train` "
            "still trains this model, without the estimate"
        ) from e
    if probe:
        result.probe = _probe(cfg, probe, result.steps)
    return result


def _probe(cfg, steps: int, run_steps: int) -> dict:
    """Train `steps` steps (the first a warm-up, not timed) on the real model in a temporary output folder:
    tokens/s of the timed steps, the run's time at that rate and this process's peak resident memory."""
    import resource
    import tempfile
    import time

    from lorafit.job import prepare
    from lorafit.train import setup_loop, train_step

    steps = max(2, steps)
    with tempfile.TemporaryDirectory(prefix="lorafit-probe-") as tmp:
        cfg.training_config.output_dir = tmp
        cfg.training_config.max_steps = steps
        job = prepare(cfg, overwrite=True)
        loop = setup_loop(job)
        job.model.train()
        tokens, start = 0, 0.0
        for step in range(steps):
            res = train_step(job, loop, step)
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)
            if step == 0:
                start = time.perf_counter()
            else:
                tokens += res.tokens
        seconds = time.perf_counter() - start
    rate = tokens / seconds if seconds > 0 else 0.0
    return {
        "steps": steps, "timed_steps": steps - 1, "tokens_per_sec": rate, "step_sec": seconds / (steps - 1),
        "seconds": run_steps * seconds / (steps - 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip


def load(model: str | None = None, adapter: str | Path | None = None, **kwargs):
    """(model, tokenizer): a base model with an adapter on it, ready to generate."""
    from lorafit.generation import load as _load

    return _load(model, adapter, **kwargs)


def generate(model, tokenizer, prompt: str, *, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, system_message: str = "auto") -> str:  # fmt: skip
    """The model's reply to one prompt, through the chat template, stopping at end-of-turn.

    `system_message` (auto | fold | drop | error) treats `system` as training's data.system_message
    treated system messages: "auto" keeps it where the template renders a system message and else
    folds it into the user turn (system text, a blank line, the prompt). To match an adapter trained
    with another policy, pass `lorafit.adapters.recorded_system_message(adapter)`.
    """
    from lorafit.generation import generate as _generate

    return _generate(
        model, tokenizer, prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
        system_message=system_message,
    )  # fmt: skip


def evaluate(
    model: str | None = None,
    data: str | Path | None = None,
    adapter: str | Path | None = None,
    *,
    max_seq_length: int = 2048,
    batch_size: int = 4,
    packing: bool = True,
    train_on: str = "assistant",
    dtype: str = "auto",
    device: str = "auto",
    quantization: str = "none",
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
    system_message: str | None = None,
) -> dict:
    """Eval loss and perplexity of base (+ adapter) on a chat data file: {eval_loss, eval_perplexity, ...}.

    `adapter`: any layout `lorafit.load` reads (`lora_alpha`/`target_modules` for a bare loralib file).
    `system_message` (data.system_message): default, the policy the adapter was trained with, else auto."""
    from lorafit.adapters import recorded_system_message
    from lorafit.attention import use_packed_sdpa
    from lorafit.data import load_conversations
    from lorafit.evaluation import eval_loss
    from lorafit.generation import load as _load
    from lorafit.model import end_of_turn
    from lorafit.tokens import tokenize

    if data is None:
        from lorafit.errors import ConfigError

        raise ConfigError("evaluate needs data=FILE (a chat JSONL/JSON/Parquet file)")
    convs = load_conversations(data)
    net, tok = _load(model, adapter, dtype=dtype, device=device, quantization=quantization, lora_alpha=lora_alpha,
                     target_modules=target_modules)  # fmt: skip
    use_packed_sdpa(net)  # the attention training's eval uses, so both give the same eval loss
    tokens, stats = tokenize(
        tok, convs, max_seq_length=max_seq_length, end_of_turn=end_of_turn(tok), train_on=train_on,
        system_message=system_message or (recorded_system_message(adapter) if adapter else "auto"),
    )  # fmt: skip
    device_t = next(net.parameters()).device
    precision = mixed_precision(None, False, device_t)  # auto, as training_config.bf16: null
    res = eval_loss(
        net, tokens, batch_size=batch_size, max_seq_length=max_seq_length, pad_id=tok.pad_token_id,
        device=device_t, precision=precision, packing=packing,
    )  # fmt: skip
    res["conversations"] = stats.conversations
    res["truncated"] = stats.truncated
    return res


def fuse(
    model: str | None,
    adapter: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    quantization: str | None = None,
    base_weights: str = "dequantized",
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
    format: str = "hf",
    gguf_type: str = "f16",
) -> Path:
    """Merge `adapter` into `model` (default: its recorded base) and write a plain Hugging Face model folder
    (mlx-lm's `fuse`; CLI `lorafit fuse`), or with `format="gguf"` OUT/model.gguf for llama.cpp and Ollama
    (`gguf_type` f32, f16, bf16 or q8_0). A QLoRA adapter merges into the dequantized base by default
    (see lorafit.export.fuse). To merge in memory instead, use `lorafit.lora.merge_adapter(model)`
    (reversible) or `lorafit.lora.merge_and_unload(model)`."""
    from lorafit import export

    return export.fuse(
        model,
        adapter,
        output_dir,
        dtype,
        overwrite=overwrite,
        quantization=quantization,
        base_weights=base_weights,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        format=format,
        gguf_type=gguf_type,
    )


def merge_adapter(model: str | None, adapter: str | Path, output_dir: str | Path, **kwargs) -> Path:
    """Deprecated alias of :func:`fuse` (same arguments), kept for one release; it warns.

    Deprecated because of a name clash: PEFT's `merge_adapter()`, and `lorafit.lora.merge_adapter(model)`,
    merge LoRA into a model in memory (reversibly), while this function writes a merged model folder.
    `lorafit.merge_adapter` (this, writes files) and `lorafit.lora.merge_adapter` (in place) are different
    functions in different namespaces; call `lorafit.fuse` for the files. Given a model object (code
    that meant the in-memory merge, e.g. through `import lorafit as lora`) it raises a TypeError naming
    `lorafit.lora.merge_adapter`."""
    if not (model is None or isinstance(model, (str, Path))):
        raise TypeError(
            f"lorafit.merge_adapter writes a merged model folder (a deprecated alias of lorafit.fuse) and takes "
            f"the base model's name or folder, not a {type(model).__name__}. To merge LoRA into a model in "
            "memory use lorafit.lora.merge_adapter(model) (`from lorafit import lora`)"
        )
    warnings.warn(
        "lorafit.merge_adapter is deprecated; use lorafit.fuse (it writes a merged model folder; "
        "lorafit.lora.merge_adapter merges in memory)",
        DeprecationWarning,
        stacklevel=2,
    )
    return fuse(model, adapter, output_dir, **kwargs)


def export_adapter(adapter: str | Path, output_dir: str | Path, layout: str = "stacked", base_model: str | None = None,
                   **kwargs) -> Path:  # fmt: skip
    """Convert an adapter to the stacked or split PEFT layout, to/from a loralib checkpoint, or to a llama.cpp
    LoRA adapter (layout "gguf", `gguf_type=` f32, f16 or bf16) ("fused" is accepted for "stacked", its
    name before)."""
    from lorafit.export import export_adapter as _export

    return _export(adapter, output_dir, layout, base_model, **kwargs)


def check_adapter(
    model: str | None,
    adapter: str | Path,
    data: str | Path,
    *,
    sample: int = 8,
    max_new_tokens: int | None = None,
    max_runaway: float = 0.125,
    max_empty: float = 0.125,
    max_repetitive: float = 0.125,
    repeat_ratio: float = 0.5,
    merge_tolerance: float | None = None,
    loss_tolerance: float = 0.01,
    **kwargs,
) -> dict:
    """Check a trained adapter before shipping it (CLI `lorafit check-adapter`): greedy replies to held-out
    prompts from `data` (runaways that never emit end-of-turn, empty and repetitive replies), merged ==
    unmerged logits, and the adapter reloaded from disk gives training's eval loss. Returns the report:
    `report["verdict"]` is "PASS" or "FAIL", `lorafit.adapter_check.format_report(report)` prints it.
    The thresholds are documented in lorafit/adapter_check.py; `kwargs` (dtype, device, quantization,
    lora_alpha, target_modules, system_message, max_seq_length, batch_size) are as for `evaluate`."""
    from lorafit.adapter_check import Thresholds
    from lorafit.adapter_check import check_adapter as _check

    th = Thresholds(sample=sample, max_new_tokens=max_new_tokens, max_runaway=max_runaway, max_empty=max_empty,
                    max_repetitive=max_repetitive, repeat_ratio=repeat_ratio, merge_tolerance=merge_tolerance,
                    loss_tolerance=loss_tolerance)  # fmt: skip
    return _check(model, adapter, data, thresholds=th, **kwargs)
