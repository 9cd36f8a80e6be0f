"""LoRA as a stage option (`stages.<name>.lora`), through peft: adapters on the LLM's linear layers
for the stage, merged into the weights when it ends, so every later step (evaluation, export, the
registry) sees a plain checkpoint. The LLM module stays where it is (`model.llm`): peft injects the
adapters in place, and the stage's other trainable modules train as configured."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import LoraModel

from model.config import LoraConfig
from model.nn.omni import OmniModel

ADAPTER = "default"


def attach(model: OmniModel, lora: LoraConfig) -> LoraModel:
    """Adapters on `model.llm`; only they of the LLM's parameters require grad afterwards."""
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none")
    return LoraModel(model.llm, config, ADAPTER)  # injects into model.llm in place


def merge(model: OmniModel, adapters: LoraModel) -> None:
    """Fold the adapters into the LLM's weights and remove them: `model.llm` is a plain Qwen2 again."""
    model.llm = adapters.merge_and_unload()
    model.llm.requires_grad_(False)
