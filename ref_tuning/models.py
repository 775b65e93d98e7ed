"""Model and tokenizer builders for the Sheared-LLaMA family, referenced from YAML by `_component_`."""

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.models.llama2._tokenizer import Llama2Tokenizer
from torchtune.modules import TransformerDecoder

from ref_tuning.config import ConfigError

# princeton-nlp/Sheared-LLaMA-2.7B, read off its config.json on the hub.
SHEARED_LLAMA_2_7B = dict(
    vocab_size=32_000,
    num_layers=32,
    num_heads=20,
    num_kv_heads=20,
    embed_dim=2560,
    intermediate_dim=6912,
    max_seq_len=4096,
    norm_eps=1e-5,
    rope_base=10_000.0,
)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj")
PEFT_NAMES = {"o_proj": "output_proj"}  # PEFT's (and HF's) names that differ from torchtune's


def check_lora_args(lora_attn_modules: Any, lora_rank: Any, lora_alpha: Any, lora_dropout: Any, **_: Any) -> None:
    """What torchtune's LoRA builders take without a word but train wrongly: an unknown target is dropped (q
    alone trains), alpha 0 trains nothing, a rank of 0 or a dropout of 1.5 fail deep inside torch."""
    accepted = f"accepted: {', '.join(LORA_TARGETS)}"
    if not isinstance(lora_attn_modules, (list, tuple)) or not lora_attn_modules:
        raise ConfigError(
            f"config key 'model.lora_attn_modules': expected a non-empty list ({accepted}), got {lora_attn_modules!r}"
        )
    for name in lora_attn_modules:
        if name in PEFT_NAMES:
            raise ConfigError(
                f"config key 'model.lora_attn_modules': {name!r} is PEFT's name; torchtune's is {PEFT_NAMES[name]!r}"
            )
        if name not in LORA_TARGETS:
            raise ConfigError(f"config key 'model.lora_attn_modules': unknown target {name!r} ({accepted})")
    checks = {
        "lora_rank": (type(lora_rank) is int and lora_rank > 0, "a positive integer", lora_rank),
        "lora_alpha": (type(lora_alpha) in (int, float) and lora_alpha > 0, "a positive number", lora_alpha),
        "lora_dropout": (type(lora_dropout) in (int, float) and 0 <= lora_dropout < 1, "in [0, 1)", lora_dropout),
    }
    for key, (ok, expected, value) in checks.items():
        if not ok:
            raise ConfigError(f"config key 'model.{key}': expected {expected}, got {value!r}")


def _checked_lora(builder: functools.partial) -> Callable[..., TransformerDecoder]:
    """`builder` with its LoRA arguments checked first; its signature stays the partial's, for the config check."""

    @functools.wraps(builder)
    def build(*args: Any, **kwargs: Any) -> TransformerDecoder:
        try:
            bound = inspect.signature(builder).bind(*args, **kwargs)
        except TypeError as e:  # "missing a required argument: 'lora_rank'"
            raise ConfigError(f"config key 'model' ({builder.func.__name__} LoRA settings): {e}") from None
        bound.apply_defaults()
        check_lora_args(**bound.arguments)
        return builder(*args, **kwargs)

    return build


# Partials, as torchtune's own qlora builders: the config check reads llama2's keyword arguments.
sheared_llama_2_7b = functools.partial(llama2, **SHEARED_LLAMA_2_7B)
sheared_llama_2_7b.__doc__ = "Sheared-LLaMA-2.7B: the LLaMA-2 architecture with 2,701,560,320 parameters."
# lora_llama2 takes no rope_base: it is always LLaMA-2's 10,000, as Sheared-LLaMA's is.
lora_sheared_llama_2_7b = _checked_lora(
    functools.partial(
        lora_llama2,
        **{key: value for key, value in SHEARED_LLAMA_2_7B.items() if key != "rope_base"},
        lora_rank=16,
        lora_alpha=32.0,
        lora_dropout=0.0,
    )
)
lora_sheared_llama_2_7b.__doc__ = (
    "Sheared-LLaMA-2.7B with torchtune's LoRA on lora_attn_modules (and apply_lora_to_mlp)."
)


# The tiny model of the demo, the tests and configs/tiny_cpu.yaml; its vocabulary follows the tokenizer.
TINY_SHEARED_LLAMA = dict(
    num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128, intermediate_dim=352, max_seq_len=2048
)
tiny_sheared_llama = functools.partial(llama2, **TINY_SHEARED_LLAMA)
tiny_sheared_llama.__doc__ = "A tiny model of the family: fewer, narrower layers (overridable); `vocab_size` required."
lora_tiny_sheared_llama = _checked_lora(functools.partial(lora_llama2, **TINY_SHEARED_LLAMA))
lora_tiny_sheared_llama.__doc__ = "Tiny, with LoRA: lora_attn_modules, lora_rank, lora_alpha and vocab_size required."


def sheared_llama_tokenizer(path: str, max_seq_len: Optional[int] = None) -> Llama2Tokenizer:
    """The LLaMA-2 SentencePiece tokenizer with no chat template: we tune a base model on raw text."""
    file = Path(path)
    expected = "expected a SentencePiece model such as the model's tokenizer.model"
    if not file.is_file() or file.stat().st_size == 0:
        found = "a directory" if file.is_dir() else "an empty file" if file.is_file() else "nothing"
        raise ConfigError(f"tokenizer.path {path}: {expected}, found {found}")
    try:
        return Llama2Tokenizer(path=path, max_seq_len=max_seq_len, prompt_template=None)
    except RuntimeError as e:  # sentencepiece: "Internal: could not parse ModelProto ..."
        raise ConfigError(f"tokenizer.path {path}: {expected}; SentencePiece cannot read it ({e})") from None


def hf_llama_config(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    torch_dtype: torch.dtype = torch.float32,
) -> Dict[str, Any]:
    """The HF `config.json` of a `LlamaForCausalLM` with the given torchtune builder arguments."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": embed_dim,
        "intermediate_size": intermediate_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": norm_eps,
        "rope_theta": rope_base,
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
    }


def llama_from_hf_config(config: Dict[str, Any]) -> TransformerDecoder:
    """The torchtune model of a LLaMA-2-family HF `config.json` (Sheared-LLaMA and its tiny kin)."""
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise ValueError(f"config.json: head_dim={config['head_dim']} differs from hidden_size / num_attention_heads")
    rope = config.get("rope_parameters") or {}
    if (config.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
        raise ValueError("config.json: rope scaling is not supported by the LLaMA-2 builder")
    return llama2(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        embed_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_base=config.get("rope_theta") or rope.get("rope_theta", 10_000.0),
    )
