"""lorafit: LoRA fine-tuning for Phi-3 and other Hugging Face causal LMs.

Two halves in one package:

- `lorafit.lora`, a torch-only LoRA layer library with loralib's API. Its names are re-exported
  here, so code written for loralib runs with `import lorafit as lora`.
- The fine-tuning pipeline: `lorafit.finetune(...)`, `lorafit.load(...)`, `lorafit.evaluate(...)`,
  `lorafit.generate(...)`, `lorafit.merge_adapter(...)`, and the `lorafit` command line over them.
"""

from lorafit.api import evaluate, export_adapter, finetune, generate, load, merge_adapter
from lorafit.lora import *  # noqa: F403  (loralib's API: lora.Linear, lora.mark_only_lora_as_trainable, ...)
from lorafit.lora import __all__ as _lora_all

__version__ = "0.1.0"
__all__ = [*_lora_all, "finetune", "load", "evaluate", "generate", "merge_adapter", "export_adapter"]
