"""LoRA references: what a run's adapters are, and its outputs for Rho-1 and for `peft`.

A LoRA run writes, for `checkpoint_best` and `checkpoint_final`, the merged model as an HF directory (what Rho-1
loads, as after full fine-tuning) and beside it `adapter_best/` / `adapter_final/`: the adapter alone in the PEFT
layout (`adapter_config.json`, `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads onto the base.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_peft_adapter_config, tune_to_peft_adapter_weights
from torchtune.modules.peft import LoRALinear, get_merged_lora_ckpt

from ref_tuning.hf_checkpoint import Config, atomic_output

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


def save_peft_adapter(adapter: StateDict, out_dir: Path, config: Config, settings: Dict[str, Any], base: Path) -> Path:
    """The adapter in the PEFT layout, for the HF model `config` (config.json) stored at `base`; written atomically."""
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    weights = tune_to_peft_adapter_weights(adapter, num_heads=heads, num_kv_heads=kv_heads, dim=dim)
    peft_config = dict(settings, peft_type="LORA", task_type="CAUSAL_LM", bias="none")
    peft_config = tune_to_peft_adapter_config(peft_config, base_model_name_or_path=str(Path(base).resolve()))
    with atomic_output(out_dir, overwrite=True) as tmp:
        tmp.mkdir()
        save_file({name: t.contiguous() for name, t in weights.items()}, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return out_dir
