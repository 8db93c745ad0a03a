"""Hugging Face keys lorafit accepts without acting on them: ignored TrainingArguments and LoraConfig keys
(one ConfigWarning each, saying why) and PEFT options accepted only at their "off" value."""

from __future__ import annotations

from typing import Any

# TrainingArguments keys that lorafit accepts and ignores: those of Microsoft's sample_finetune.py that
# lorafit does not act on, plus keys commonly copied from Trainer scripts. lorafit runs its own training
# loop (it does not use transformers.Trainer), which is why most of them have no meaning here.
IGNORED_TRAINING_KEYS: dict[str, str] = {
    # in Microsoft's sample_finetune.py
    "do_eval": "evaluation is controlled by eval_strategy",
    "log_level": "lorafit does not change transformers' logging level",
    "logging_strategy": "lorafit logs every logging_steps optimizer steps",
    "overwrite_output_dir": "lorafit has no such option (transformers 5 removed it too)",
    "remove_unused_columns": "lorafit builds the model inputs itself",
    # flags of Hugging Face example scripts
    "do_train": "the lorafit command decides what runs",
    "do_predict": "the lorafit command decides what runs",
    "log_level_replica": "lorafit does not change transformers' logging level; only rank 0 logs",
    "logging_first_step": "lorafit logs every logging_steps optimizer steps",
    # reporting and the Hub
    "logging_dir": "transformers 5 removed it; lorafit's TensorBoard event files go to OUTPUT_DIR/runs",
    "disable_tqdm": "lorafit's progress display is not configured in training_config",
    "push_to_hub": "lorafit does not upload to the Hugging Face Hub",
    "hub_model_id": "lorafit does not upload to the Hugging Face Hub",
    "hub_strategy": "lorafit does not upload to the Hugging Face Hub",
    "hub_private_repo": "lorafit does not upload to the Hugging Face Hub",
    "hub_token": "lorafit does not upload to the Hugging Face Hub (and a token does not belong in a config file)",
    # optimizer, precision, speed
    "optim": "lorafit always uses torch AdamW, fused on CUDA (adamw_torch_fused), foreach elsewhere",
    "tf32": "lorafit does not change torch's TF32 setting",
    "torch_compile": "lorafit does not torch.compile the model",
    "bf16_full_eval": "evaluation runs in the same precision as training",
    "fp16_full_eval": "evaluation runs in the same precision as training",
    "auto_find_batch_size": "set per_device_train_batch_size explicitly",
    "group_by_length": "lorafit batches examples in order; packing avoids padding instead",
    # data loading
    "dataloader_num_workers": "lorafit's data loading has no worker processes to configure",
    "dataloader_pin_memory": "lorafit's data loading is not configured in training_config",
    "dataloader_drop_last": "lorafit's data loading is not configured in training_config",
    # checkpoints
    "save_safetensors": "lorafit always writes safetensors",
    "load_best_model_at_end": "lorafit does not track a best checkpoint",
    "metric_for_best_model": "lorafit does not track a best checkpoint",
    "greater_is_better": "lorafit does not track a best checkpoint",
    # devices and distribution
    "use_cpu": "choose the device with model.device",
    "no_cuda": "choose the device with model.device",
    "local_rank": "set by torchrun; lorafit reads the process group from the environment",
    "ddp_find_unused_parameters": "lorafit wraps the model in DDP or FSDP itself",
    "ddp_backend": "lorafit chooses it: nccl on CUDA, gloo otherwise",
    "deepspeed": "not supported; lorafit uses DDP or FSDP (training_config.fsdp)",
    "fsdp_config": "lorafit shards each decoder layer with FSDP2 itself (training_config.fsdp)",
}

# Ignored keys that are accepted without a warning at these values (lorafit does that anyway).
QUIET_TRAINING_VALUES: dict[str, tuple[Any, ...]] = {"optim": ("adamw_torch", "adamw_torch_fused")}

# LoraConfig keys that lorafit accepts and ignores.
IGNORED_PEFT_KEYS: dict[str, str] = {
    "inference_mode": "the lorafit command decides whether the adapter is trained",
    "fan_in_fan_out": "lorafit adapts nn.Linear layers, whose weights are never stored fan-in-fan-out",
    "revision": "the base model's revision is model.revision",
    "base_model_name_or_path": "the base model is model.name_or_path",
}

# LoraConfig options lorafit does not implement: key -> (values that mean "off" and are accepted, error).
UNSUPPORTED_PEFT_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((False, None), "DoRA is not supported by lorafit; remove use_dora or set it to false"),
    "fan_in_fan_out": (
        (False, None),
        "fan_in_fan_out: true is for GPT-2 style Conv1D layers, which lorafit does not adapt; remove it",
    ),
    "layers_to_transform": (
        (None,),
        "adapting only some layers is not supported; remove it and select modules with a regex in "
        "target_modules or exclude_modules instead",
    ),
    "layers_pattern": (
        (None,),
        "adapting only some layers is not supported; remove it and select modules with a regex in "
        "target_modules or exclude_modules instead",
    ),
    "rank_pattern": (
        (None, {}),
        "per-module ranks are not supported yet; remove it (every adapted module uses r)",
    ),
    "alpha_pattern": (
        (None, {}),
        "per-module alphas are not supported yet; remove it (every adapted module uses lora_alpha)",
    ),
    "lora_bias": ((False, None), "lora_bias is not supported; remove it or set it to false"),
    "loftq_config": ((None, {}), "LoftQ initialization is not supported; remove loftq_config"),
    "layer_replication": ((None, []), "layer_replication is not supported; remove it"),
    "target_parameters": (
        (None, []),
        "target_parameters is not supported; adapt modules with target_modules",
    ),
    "trainable_token_indices": ((None, [], {}), "trainable_token_indices is not supported; remove it"),
    "peft_type": (("LORA",), "lorafit trains LoRA adapters only; remove peft_type or set it to LORA"),
}
