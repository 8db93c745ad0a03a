"""Run configuration: typed dataclasses with every default in one place, validated on construction.

A run config has four sections. ``training_config`` and ``peft_config`` use the key names of Hugging Face
``TrainingArguments`` and PEFT ``LoraConfig``, so the two dicts of Microsoft's "Fine-tuning Phi-3 with LoRA"
guide (``sample_finetune.py``) load as written. ``model`` and ``data`` are lorafit's own::

    model:            ModelConfig     which base model, dtype, attention kernel, device
    data:             DataConfig      train/eval data and which tokens get loss
    training_config:  TrainingConfig  optimizer, schedule, batch sizes, logging/eval/save cadence
    peft_config:      PeftConfig      LoRA rank, alpha, dropout, target modules

Precedence, lowest first (see :func:`load_config`): the defaults below < the config file (YAML, or JSON
when its name ends in ``.json``) < ``base`` (values of command-line flags) < ``--set section.key=value``
overrides, whose values are read as YAML (``--set peft_config.target_modules=[qkv_proj,o_proj]``).

Checking:

* An unknown key is an error that lists the valid keys; a value of the wrong type or out of range is an error
  naming the key, the expected type and the value. Every problem found in one config is reported together,
  in one :class:`~lorafit.errors.ConfigError`, each line prefixed with where the value came from
  (``file:line``, ``command line`` or ``--set ...``).
* Keys that Hugging Face users copy but lorafit does not act on (:data:`IGNORED_TRAINING_KEYS`,
  :data:`IGNORED_PEFT_KEYS`) are accepted with one one-line :class:`ConfigWarning` each.
  PEFT options lorafit does not implement (:data:`UNSUPPORTED_PEFT_OPTIONS`) are accepted only at their
  "off" value (``use_dora: false``); anything else is an error.
* Aliases: ``evaluation_strategy`` = ``eval_strategy`` and ``max_length`` = ``max_seq_length``.
* PyYAML reads YAML 1.1, so two gotchas are handled: ``1e-4`` (no dot) is read as a *string*, so numeric
  strings are accepted for number fields; and a bare ``no`` is read as ``false``, so ``eval_strategy: no``
  and ``save_strategy: no`` work.

Paths (``model.name_or_path``, ``model.adapter``, ``data.train``, ``data.eval``, ``training_config.output_dir``): a leading
``~`` is expanded and nothing else (no environment variables, no globbing). A relative path is relative to
the current working directory, not to the config file's directory, as with any command-line tool.

The package: ``sections.py`` (the dataclasses, every default), ``base.py`` (what the sections share:
checks from annotations, from_dict, error and warning wording), ``checks.py`` (value checks),
``hf_keys.py`` (ignored and unsupported Hugging Face keys), ``files.py`` (files, layering, load/save).
"""

from lorafit.config.base import ConfigWarning
from lorafit.config.files import SHIPPED_CONFIGS_DIR, config_text, load_config, save_config
from lorafit.config.hf_keys import IGNORED_PEFT_KEYS, IGNORED_TRAINING_KEYS, UNSUPPORTED_PEFT_OPTIONS
from lorafit.config.sections import SECTIONS, DataConfig, ModelConfig, PeftConfig, RunConfig, TrainingConfig

__all__ = [
    "IGNORED_PEFT_KEYS",
    "IGNORED_TRAINING_KEYS",
    "SECTIONS",
    "SHIPPED_CONFIGS_DIR",
    "UNSUPPORTED_PEFT_OPTIONS",
    "ConfigWarning",
    "DataConfig",
    "ModelConfig",
    "PeftConfig",
    "RunConfig",
    "TrainingConfig",
    "load_config",
    "save_config",
    "config_text",
]
