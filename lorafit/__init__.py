"""lorafit: LoRA fine-tuning for Phi-3 and other Hugging Face causal LMs.

Two halves in one package:

- `lorafit.lora`, a torch-only LoRA layer library with loralib's API. Its names are re-exported
  here, so code written for loralib runs with `import lorafit as lora`.
- The fine-tuning pipeline: `lorafit.finetune(...)`, `lorafit.estimate(...)` (will it fit?),
  `lorafit.load(...)`, `lorafit.evaluate(...)`, `lorafit.generate(...)`, `lorafit.fuse(...)` (write a
  merged model folder), `lorafit.check_adapter(...)` (is a trained adapter fit to ship?), and the
  `lorafit` command line over them.

One name differs between the halves: `lorafit.merge_adapter` is the pipeline's deprecated alias of
`lorafit.fuse` (it writes files), while `lorafit.lora.merge_adapter` merges in memory, as PEFT's does.
"""

# The library's names first, then the pipeline's, so lorafit.merge_adapter is the pipeline's (see above).
# isort: off
from lorafit.lora import *  # noqa: F403  (loralib's API: lora.Linear, lora.mark_only_lora_as_trainable, ...)
from lorafit.lora import __all__ as _lora_all
from lorafit.api import (
    check_adapter,
    estimate,
    evaluate,
    export_adapter,
    finetune,
    fuse,
    generate,
    load,
    merge_adapter,
)
# isort: on

__version__ = "0.1.0"
_library = [n for n in _lora_all if n != "merge_adapter"]
__all__ = [
    *_library,
    "finetune",
    "estimate",
    "load",
    "evaluate",
    "generate",
    "fuse",
    "merge_adapter",
    "export_adapter",
    "check_adapter",
]
