"""Exact conversions of LoRA factors between a stacked module and its pieces.

Runtimes that know Phi-3 only as a Llama model expect `q_proj`/`k_proj`/`v_proj` and
`gate_proj`/`up_proj` keys, where Phi-3 has one stacked `qkv_proj` and `gate_up_proj` (the rows of
the pieces one above the other; vLLM's word, `stacked_params_mapping`). A stacked layout names the
pieces of each stacked module and their row counts, e.g.

    {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [96, 32, 32])}

:func:`split_loras` turns a stacked module's LoRA into one LoRA per piece (exact: A is shared or
per slice, B's rows are cut), and :func:`stack_loras` puts pieces back into one stacked-module LoRA
(the slice form, or the shared-A whole-module form when every piece has the same A). The caller
supplies the layout: the library knows no model family.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from lorafit.lora.peft_format import ModuleLora, _join
from lorafit.lora.state import LoraError

# stacked leaf name -> (piece leaf names, row sizes), e.g. {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [96, 32, 32])}
StackedLayout = Mapping[str, tuple[Sequence[str], Sequence[int]]]

__all__ = ["StackedLayout", "split_loras", "stack_loras"]


def _scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


def split_loras(loras: Mapping[str, ModuleLora], layout: StackedLayout) -> dict[str, ModuleLora]:
    """One LoRA per piece for every stacked module in `layout` (exact: A copied or cut per slice, B's
    rows cut; a slice LoRA yields only its enabled pieces). Other modules are passed through."""
    out: dict[str, ModuleLora] = {}
    for name, m in loras.items():
        parent, _, leaf = name.rpartition(".")
        if leaf not in layout or m.kind != "linear":
            out[name] = m
            continue
        pieces, sizes = list(layout[leaf][0]), [int(s) for s in layout[leaf][1]]
        if m.slices is None:
            if m.B.shape[0] != sum(sizes):
                raise LoraError(
                    f"{name}: lora_B has {m.B.shape[0]} rows, but {leaf} splits into {dict(zip(pieces, sizes))} "
                    f"({sum(sizes)} rows). Fix: pass the base model the adapter was trained on."
                )
            for piece, rows in zip(pieces, m.B.split(sizes)):
                out[_join(parent, piece)] = ModuleLora("linear", m.A.clone(), rows.clone(), m.r, m.alpha)
            continue
        if list(m.slices["split_sizes"]) != sizes:
            raise LoraError(
                f"{name}: the adapter's slices {m.slices['split_sizes']} are not {leaf}'s pieces "
                f"{dict(zip(pieces, sizes))}. Fix: pass the base model the adapter was trained on."
            )
        row, j = 0, 0
        for piece, size, on in zip(pieces, sizes, m.slices["enable_lora"]):
            if on:
                a = m.A[j * m.r : (j + 1) * m.r].clone()
                out[_join(parent, piece)] = ModuleLora(
                    "linear", a, m.B[row : row + size].clone(), m.r, m.alpha
                )
                row += size
                j += 1
    return out


def _stack(parts: dict[int, ModuleLora], sizes: list[int], use_rslora: bool) -> ModuleLora:
    ms = [parts[i] for i in sorted(parts)]
    first = ms[0]
    if len(ms) == len(sizes) and all(
        m.r == first.r and m.alpha == first.alpha and torch.equal(m.A, first.A) for m in ms
    ):  # a whole-module LoRA that was split: shared A, stacked B
        return ModuleLora("linear", first.A, torch.cat([m.B for m in ms]), first.r, first.alpha)
    # Slice form. Unequal ranks are padded with zero rows of A / columns of B (exact); the scale is that
    # of a highest-rank piece (the one whose scale most pieces share), and a piece with another scale has
    # its B rescaled (the only rounding).
    scales = Counter(_scale(m.alpha, m.r, use_rslora) for m in ms)
    top = [m for m in ms if m.r == max(m.r for m in ms)]
    ref = max(top, key=lambda m: scales[_scale(m.alpha, m.r, use_rslora)])
    r, scale = ref.r, _scale(ref.alpha, ref.r, use_rslora)
    a_parts, b_parts = [], []
    for m in ms:
        a, b = m.A, m.B
        if m.r < r:
            a = torch.cat([a, a.new_zeros(r - m.r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], r - m.r)], 1)
        s = _scale(m.alpha, m.r, use_rslora)
        if s != scale:
            b = (b.float() * (s / scale)).to(b.dtype)
        a_parts.append(a)
        b_parts.append(b)
    slices = {"split_sizes": list(sizes), "enable_lora": [i in parts for i in range(len(sizes))]}
    return ModuleLora("linear", torch.cat(a_parts), torch.cat(b_parts), r, ref.alpha, slices)


def stack_loras(
    loras: Mapping[str, ModuleLora],
    layout: StackedLayout,
    *,
    use_rslora: bool = False,
    want: Callable[[str, str], bool] | None = None,
) -> tuple[dict[str, ModuleLora], list[str]]:
    """Put per-piece LoRAs (`...q_proj`, `...v_proj`) back into one LoRA of their stacked module.

    Exact: pieces with a shared A become the whole-module LoRA (A, stacked B), otherwise the slice form
    (stacked A, stacked B, rank = the pieces' rank each, i.e. a block-diagonal B of rank k*r; lower
    ranks are zero-padded). Only pieces whose alpha/r differs from the others get B rescaled (rounded).
    `want(stacked_name, piece_name)` picks which pieces to stack (default all). Returns (loras, problems).
    """
    piece_of = {p: (stacked, i) for stacked, (pieces, _) in layout.items() for i, p in enumerate(pieces)}
    out: dict[str, ModuleLora] = {}
    groups: dict[str, dict[int, ModuleLora]] = {}
    problems: list[str] = []
    for name, m in loras.items():
        parent, _, leaf = name.rpartition(".")
        hit = piece_of.get(leaf)
        stacked_name = _join(parent, hit[0]) if hit else ""
        if (
            hit is None
            or m.kind != "linear"
            or m.slices is not None
            or (want and not want(stacked_name, name))
        ):
            out[name] = m
            continue
        groups.setdefault(stacked_name, {})[hit[1]] = m
    for stacked_name, parts in groups.items():
        pieces, sizes = layout[stacked_name.rpartition(".")[2]]
        sizes = [int(s) for s in sizes]
        bad = [
            f"{pieces[i]} has lora_B {tuple(m.B.shape)}, lora_A {tuple(m.A.shape)}"
            for i, m in parts.items()
            if m.B.shape[0] != sizes[i] or m.A.shape[1] != next(iter(parts.values())).A.shape[1]
        ]
        if stacked_name in out:
            problems.append(
                f"{stacked_name}: the adapter has a LoRA for it and for its pieces {sorted(parts)}"
            )
        elif bad:
            problems.append(
                f"wrong shape for the pieces of {stacked_name} (rows {dict(zip(pieces, sizes))}): "
                + "; ".join(bad)
            )
        else:
            out[stacked_name] = _stack(parts, sizes, use_rslora)
    return out, problems
