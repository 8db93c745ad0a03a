"""What a tokenizer's chat template does with a conversation, and making sure nothing is lost.

Chat text always comes from the tokenizer's own template, but real templates differ:

- some render no system message at all (the real Phi-3-mini template keeps only `user` and
  `assistant` turns) and some raise on one (Gemma: "System role not supported");
- some add text of their own (Qwen2 inserts "You are a helpful assistant" when no system message
  is given), trim whitespace (Llama 3), or ignore roles they do not know;
- the token that closes an assistant turn differs: `<|end|>` (Phi-3), `<|im_end|>` (ChatML: Qwen2,
  SmolLM2), `<|eot_id|>` (Llama 3), `</s>` (Mistral), `<end_of_turn>` (Gemma).

`ChatTemplate.probe(tokenizer)` finds these out once, by rendering three short probe
conversations. `prepare(messages, template, policy)` applies the system-message policy:

    policy   template renders system       template drops it or raises on it
    auto     kept                          folded into the first user turn
    fold     folded                        folded
    drop     dropped                       dropped
    error    kept                          an error naming the conversation

Folding puts the system text, a blank line, then the user's text into the first user turn that
follows it: ``system + "\\n\\n" + user`` (`FOLD_SEPARATOR`). After rendering, `missing_content`
checks that every message's content appears in the text, in order, so any other loss (a role the
template ignores, content it rewrites) is caught and reported with the conversation's file:line.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import DataError

SYSTEM_MESSAGE = ("auto", "fold", "drop", "error")


class SystemMessageWarning(UserWarning):
    """System messages were folded into the first user turn because the template renders none."""


FOLD_SEPARATOR = "\n\n"

# Probe texts: plain letters, so no template trims, escapes or splits them.
_SYSTEM_PROBE = "lorafitprobesystemtext"
_USER_PROBE = "lorafitprobeusertext"
_ASSISTANT_PROBE = "lorafitprobeassistanttext"


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The tokenizer's own chat template applied to `messages`, as text (a DataError if it raises)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so conversations cannot be rendered. "
            "Fix: use a chat (instruct) model's tokenizer, or set tokenizer.chat_template"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # the template raised (e.g. "roles must alternate")
        raise DataError(f"the tokenizer's chat template cannot render this conversation: {e}") from None


@dataclass(frozen=True)
class ChatTemplate:
    """What a tokenizer's chat template does, found by rendering probe conversations.

    renders_system: a system message's text appears in the output.
    system_error: the template's own message when it raises on a system message (Gemma), else None.
    end_of_turn: the special token written right after an assistant turn's content ("" if none).
    """

    renders_system: bool
    system_error: str | None
    end_of_turn: str

    @classmethod
    def probe(cls, tokenizer) -> ChatTemplate:
        user = {"role": "user", "content": _USER_PROBE}
        reply = {"role": "assistant", "content": _ASSISTANT_PROBE}
        text = render(tokenizer, [user, reply], add_generation_prompt=False)
        try:
            with_system = tokenizer.apply_chat_template(
                [{"role": "system", "content": _SYSTEM_PROBE}, user, reply], tokenize=False
            )
            renders, error = _SYSTEM_PROBE in with_system, None
        except Exception as e:  # a template without a system role raises rather than drop it
            renders, error = False, str(e) or type(e).__name__
        return cls(renders_system=renders, system_error=error, end_of_turn=_closing_token(tokenizer, text))


def _closing_token(tokenizer, text: str) -> str:
    """The special token that follows the probe reply in `text` (whitespace between them allowed)."""
    at = text.find(_ASSISTANT_PROBE)
    if at < 0:
        return ""
    after = text[at + len(_ASSISTANT_PROBE) :].lstrip()
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= set((tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}) or {})
    matches = [tok for tok in specials if tok and after.startswith(tok)]
    return max(matches, key=len) if matches else ""


def prepare(
    messages: list[dict], template: ChatTemplate, policy: str = "auto"
) -> tuple[list[dict], str | None]:
    """Apply the system-message `policy` (see the module docstring) for this `template`.

    Returns (messages to render, what happened to the system message: None when there is none,
    else "kept", "folded" or "dropped"). Raises DataError for policy "error" on a template that
    does not render system messages, and when there is no user turn after a system message to
    fold it into.
    """
    if policy not in SYSTEM_MESSAGE:
        raise ValueError(f"system_message must be one of {', '.join(SYSTEM_MESSAGE)}, got {policy!r}")
    if not any(m["role"] == "system" for m in messages):
        return messages, None
    action = policy
    if policy in ("auto", "error"):
        action = "keep" if template.renders_system else ("fold" if policy == "auto" else "error")
    if action == "keep":
        return messages, "kept"
    if action == "error":
        why = f"raises: {template.system_error}" if template.system_error else "renders no system message"
        raise DataError(
            f"this model's chat template {why}, so the system message would be lost. "
            f"Fix: set data.system_message to fold (system text joined to the first user turn), drop, or auto"
        )
    if action == "drop":
        return [m for m in messages if m["role"] != "system"], "dropped"
    out: list[dict] = []
    pending: list[str] = []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
        elif m["role"] == "user" and pending:
            out.append({**m, "content": FOLD_SEPARATOR.join([*pending, m["content"]])})
            pending = []
        else:
            out.append(m)
    if pending:
        raise DataError(
            "a system message has no user turn after it to fold into. Fix: add the user turn, or drop it"
        )
    return out, "folded"


def missing_content(text: str, messages: list[dict]) -> list[tuple[int, str]]:
    """(index, role) of each message whose content is not found in `text` after the previous one's.

    A template may trim surrounding whitespace, so the stripped content also counts as found.
    """
    missing = []
    pos = 0
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        if not content.strip():
            continue
        at = text.find(content, pos)
        if at < 0:
            content = content.strip()
            at = text.find(content, pos)
        if at < 0:
            missing.append((i, m["role"]))
            continue
        pos = at + len(content)
    return missing


def describe_missing(missing: list[tuple[int, str]], reader: str = "training") -> str:
    """One sentence for a DataError: which messages the template dropped or rewrote, which `reader`
    ("training", "the model") would then not see."""
    which = ", ".join(f"messages[{i}] ({role})" for i, role in missing)
    return (
        f"the chat template dropped or rewrote the content of {which}, so {reader} would not see it. "
        f"Fix: use roles this model's template renders (usually system, user, assistant), or a template "
        f"that keeps them"
    )
