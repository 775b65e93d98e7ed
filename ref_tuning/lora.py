"""LoRA references: a run's LoRA settings, read off its model, and the merge of its adapters into the weights.

For `checkpoint_best` and `checkpoint_final` a LoRA run writes the merged model (what Rho-1 loads, as after full
fine-tuning) and, beside it, the adapter alone in the PEFT layout (`HFBinCheckpointer`, given torchtune's adapter keys).
"""

from typing import Any, Dict, Optional, Tuple

import torch
from torchtune.modules.peft import LoRALinear, get_merged_lora_ckpt

StateDict = Dict[str, torch.Tensor]


def lora_settings(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """The model's LoRA settings in PEFT's terms (r, lora_alpha, lora_dropout, torchtune's target module names),
    read off its LoRA layers; None for a model without adapters."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    dropout = first.dropout.p if isinstance(first.dropout, torch.nn.Dropout) else 0.0
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return {"r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": targets}


def merge(state_dict: StateDict, settings: Dict[str, Any]) -> Tuple[StateDict, StateDict]:
    """(the merged weights, W + alpha / r * B A with the adapters gone; the adapters alone), from the full
    weights of a LoRA model. Merge before casting to the output dtype: the update is small beside W."""
    adapter = {name: t for name, t in state_dict.items() if ".lora_" in name}  # merging pops them, unchanged
    merged = get_merged_lora_ckpt(state_dict, rank=settings["r"], alpha=settings["lora_alpha"])
    return merged, adapter
