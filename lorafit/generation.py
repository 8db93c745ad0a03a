"""Using a trained adapter: load base + adapter, generate through the chat template, chat.

Prompts are rendered with the tokenizer's own chat template and the generation prompt
(`<|assistant|>\\n` for Phi-3); generation stops at the template's end-of-turn token (`<|end|>`),
at EOS, or at any EOS id in the model's generation_config.

A system prompt goes through the same `lorafit.templates.prepare` as training's system messages,
with the same `system_message` policy (auto | fold | drop | error), so a model whose template renders
no system message (the real Phi-3-mini's) sees the system text folded into the first user turn exactly
as it was in training. The CLI uses the policy the adapter records
(`lorafit.adapters.recorded_system_message`); the Python functions take `system_message=` ("auto").
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lorafit.adapters import adapter_base, adapter_quantization, load_any_adapter
from lorafit.config import ModelConfig
from lorafit.errors import AdapterError, ConfigError, DataError
from lorafit.model import load_model, load_tokenizer, resolve_device, stop_token_ids
from lorafit.quant import check_adapter_quantization
from lorafit.templates import ChatTemplate, describe_missing, missing_content, prepare, render


def load(
    model: str | None = None,
    adapter: str | Path | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization: str = "none",
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
):
    """Load a base model (hub id or folder) and optionally an adapter onto it; returns (model, tokenizer).

    With `model=None` the base recorded in the adapter is used. The adapter is a PEFT folder (stacked or
    split keys), a loralib `.pt` file or the folder `lorafit export --layout loralib` writes; a bare
    loralib file records no alpha: pass `lora_alpha` (and `target_modules` when its slices are
    ambiguous). `quantization` (nf4, fp4, int8) loads the base quantized, as a QLoRA adapter was
    trained (lorafit/quant.py), with the double quant the adapter records. An adapter that records a
    quantization other than `quantization` (none included) gets one QuantizationWarning: its results
    will differ from training's.
    """
    if model is None:
        if adapter is None:
            raise AdapterError("pass a base model, an adapter, or both")
        model = adapter_base(adapter)
    recorded: dict = {}
    if adapter is not None:
        recorded = adapter_quantization(Path(adapter).expanduser())
        check_adapter_quantization(recorded, quantization, adapter)
    double_quant = recorded.get("double_quant") if recorded.get("method") == quantization else None
    cfg = ModelConfig(
        name_or_path=str(model), dtype=dtype, device=device, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, revision=revision, quantization=quantization,
        bnb_4bit_use_double_quant=True if double_quant is None else double_quant,
    )  # fmt: skip
    torch_device = resolve_device(cfg.device, "device")  # a device that is not there: an error before loading
    tokenizer = load_tokenizer(cfg.name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    net = load_model(cfg, device=torch_device, training=False)
    if adapter is not None:
        load_any_adapter(net, adapter, lora_alpha=lora_alpha, target_modules=target_modules)
    net.eval()
    return net, tokenizer


def build_messages(prompt: str, system: str | None = None, history: list[dict] | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + list(history or []) + [{"role": "user", "content": prompt}]


def check_text(messages: list[dict]) -> None:
    """A DataError naming the first message whose content is not text: a lone surrogate code point, as
    Python makes of bytes that are not UTF-8 in a command-line argument or typed input."""
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"the {m['role']} text (message {i}) has a character that is not text at position {e.start} "
                f"(U+{ord(m['content'][e.start]):04X}: bytes that are not UTF-8, or half of a surrogate pair). "
                f"Fix: type or pass it again as UTF-8 text"
            ) from None


def prompt_text(
    tokenizer, messages: list[dict], *, system_message: str = "auto", template: ChatTemplate | None = None
) -> str:
    """The text generation continues from: `messages` (ending with a user turn) prepared with the
    `system_message` policy exactly as training prepares a conversation, rendered with the generation
    prompt. This is training's render of the same conversation up to the assistant reply.

    A DataError when the policy is "error" and the template renders no system message, or when the
    template loses any other message's content. `template` saves probing the tokenizer again.
    """
    template = template or ChatTemplate.probe(tokenizer)
    check_text(messages)
    prepared, _ = prepare(messages, template, system_message)
    text = render(tokenizer, prepared, add_generation_prompt=True)
    missing = missing_content(text, prepared)
    if missing:
        raise DataError(describe_missing(missing, "the model"))
    return text


def _fit_context(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """`max_new_tokens`, lowered (with a warning) so that prompt and reply fit the model's context
    (`config.max_position_embeddings`); a DataError when the prompt alone fills it."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return max_new_tokens
    if prompt_tokens >= context:
        raise DataError(
            f"the prompt is {prompt_tokens:,} tokens, but the model reads at most {context:,} "
            f"(max_position_embeddings), leaving no room for a reply. Fix: shorten the prompt "
            f"(in chat: /reset clears the conversation so far)"
        )
    if prompt_tokens + max_new_tokens > context:
        room = context - prompt_tokens
        warnings.warn(
            f"the prompt is {prompt_tokens:,} tokens of the model's {context:,}: the reply is limited to {room:,} "
            f"tokens instead of max_new_tokens={max_new_tokens:,}",
            stacklevel=3,
        )
        return room
    return max_new_tokens


@torch.no_grad()
def generate_tokens(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
    system_message: str = "auto",
    template: ChatTemplate | None = None,
) -> tuple[torch.Tensor, int]:
    """(new token ids, the token limit used): the reply tokens of each conversation, one row each,
    padded after a stop token with the pad id, and `max_new_tokens` as lowered to fit the context.
    What `generate_batch` decodes; `lorafit.adapter_check` reads the rows to see where a reply stopped."""
    template = template or ChatTemplate.probe(tokenizer)
    texts = [
        prompt_text(tokenizer, c, system_message=system_message, template=template) for c in conversations
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens follow every prompt directly
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    max_new_tokens = _fit_context(model, enc["input_ids"].shape[1], max_new_tokens)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if temperature > 0
        else dict(do_sample=False)
    )
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        streamer=streamer,
        **kwargs,
    )
    return out[:, enc["input_ids"].shape[1] :], max_new_tokens


def generate_batch(model, tokenizer, conversations: list[list[dict]], **kwargs) -> list[str]:
    """Reply to each conversation (lists of messages ending with a user turn). Greedy when temperature=0.
    System messages follow `system_message` as in training (see `prompt_text`); the keyword arguments
    are `generate_tokens`'s."""
    new, _ = generate_tokens(model, tokenizer, conversations, **kwargs)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def generate(
    model, tokenizer, prompt: str, *, system: str | None = None, system_message: str = "auto", **kwargs
) -> str:
    """One reply to one prompt (optionally with a system message, treated per `system_message`)."""
    return generate_batch(
        model, tokenizer, [build_messages(prompt, system)], system_message=system_message, **kwargs
    )[0]


def chat(model, tokenizer, *, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
         system_message: str = "auto", input_fn=input, print_fn=print) -> None:  # fmt: skip
    """An interactive loop: type a message, get the reply streamed. /reset clears history, /exit quits.
    The system message is treated per `system_message`, as in training; a policy the template cannot
    honour ("error" on a template without a system role) stops before the first prompt."""
    from transformers import TextStreamer

    template = ChatTemplate.probe(tokenizer)
    if system:  # "error" on a template that renders no system message: said before anything is typed
        check_text([{"role": "system", "content": system}])
        prepare(build_messages("", system), template, system_message)
    history: list[dict] = []
    print_fn("lorafit chat: /reset clears the conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            text = input_fn(">>> ").strip()
        except EOFError:
            print_fn("")
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = generate_batch(
                model, tokenizer, [build_messages(text, system, history)], max_new_tokens=max_new_tokens,
                temperature=temperature, streamer=streamer, system_message=system_message, template=template,
            )[0]  # fmt: skip
        except DataError as e:  # text that is not UTF-8, a conversation beyond the context: say so, go on
            print_fn(f"error: {e}")
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
