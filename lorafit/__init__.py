"""lorafit: LoRA fine-tuning for Phi-3 and other Hugging Face causal LMs."""

__version__ = "0.1.0"
