"""HF `.bin` shards <-> torchtune state dicts.

`HFBinCheckpointer` implements torchtune's checkpointer interface (`load_checkpoint`,
`save_checkpoint`). It differs from torchtune's `FullModelHFCheckpointer` where Rho-1 needs it to:
it writes the hub's file names (`pytorch_model-0000K-of-0000N.bin`), a `config.json` whose dtype is
the dtype actually written, and copies the tokenizer and generation files, so that the output
directory is a complete HF model.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torchtune.models import convert_weights
from torchtune.training import MODEL_KEY

INDEX_FILE = "pytorch_model.bin.index.json"
SINGLE_FILE = "pytorch_model.bin"
# Everything besides the weights that makes an HF directory usable on its own.
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as it is; the message says what to fix."""


def parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5e9 bytes, as `transformers` reads `max_shard_size`; ints are bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB' or '500MB', got {size!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def read_hf_config(checkpoint_dir: Union[str, Path]) -> Dict[str, Any]:
    """Read and sanity-check `config.json` of a LLaMA-family HF directory."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; an HF model directory needs its config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{path}: expected an integer '{key}', found {config.get(key)!r}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise CheckpointError(
            f"{path}: num_attention_heads={config['num_attention_heads']} does not divide "
            f"hidden_size={config['hidden_size']}; fix the config to match the weights"
        )
    return config


def _conversion_args(config: Dict[str, Any]) -> Dict[str, int]:
    num_heads = config["num_attention_heads"]
    return dict(
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        dim=config["hidden_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
    )


def hf_to_tune(hf_sd: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """HF names and rotary layout to torchtune's (q and k are permuted per head)."""
    return convert_weights.hf_to_tune(hf_sd, **_conversion_args(config))


def tune_to_hf(tune_sd: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The inverse of `hf_to_tune`: exact, since the permutation only moves values."""
    return convert_weights.tune_to_hf(tune_sd, **_conversion_args(config))


def shard_files(checkpoint_dir: Union[str, Path]) -> List[Path]:
    """The `.bin` files of an HF directory, in index order; checks that each one exists."""
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' of parameter -> file")
        files = [checkpoint_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (checkpoint_dir / SINGLE_FILE).is_file():
        files = [checkpoint_dir / SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{checkpoint_dir}: found neither {INDEX_FILE} nor {SINGLE_FILE}; "
            "expected an HF directory with PyTorch .bin weights"
        )
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {index_path.name} but missing")
    return files


def load_hf_state_dict(checkpoint_dir: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """All tensors of an HF `.bin` directory, memory-mapped and loaded weights-only (never unpickled code)."""
    state_dict: Dict[str, torch.Tensor] = {}
    for f in shard_files(checkpoint_dir):
        try:
            shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe files
            raise CheckpointError(f"{f}: cannot be loaded as a weights-only PyTorch file ({e})") from e
        state_dict.update(shard)
    return state_dict


def _plan_shards(names: Iterable[str], sizes: Dict[str, int], max_shard_size: int) -> List[List[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    shards: List[List[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _dtype_name(state_dict: Dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise CheckpointError(f"expected one floating dtype in the state dict, found {sorted(map(str, dtypes))}")
    return str(dtypes.pop()).removeprefix("torch.")


def save_hf_checkpoint(
    hf_sd: Dict[str, torch.Tensor],
    out_dir: Union[str, Path],
    config: Dict[str, Any],
    side_files_from: Optional[Union[str, Path]] = None,
    max_shard_size: Union[int, str] = "5GB",
) -> Path:
    """Write an HF directory: `.bin` shards, their index, `config.json` and the side files.

    The directory is written beside `out_dir` under a temporary name and renamed at the end, so a
    crash never leaves a half-written `out_dir`; an existing `out_dir` is replaced.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sizes = {k: t.numel() * t.element_size() for k, t in hf_sd.items()}
    shards = _plan_shards(hf_sd.keys(), sizes, parse_size(max_shard_size))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        weight_map = {}
        for k, names in enumerate(shards, start=1):
            file_name = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
            # contiguous(): torch.save writes a view's whole storage, not only the view.
            torch.save({n: hf_sd[n].contiguous() for n in names}, tmp / file_name)
            weight_map.update(dict.fromkeys(names, file_name))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = dict(config, torch_dtype=_dtype_name(hf_sd))
        config["dtype"] = config["torch_dtype"]  # transformers >= 4.56 reads `dtype`
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if side_files_from is not None:
            for name in SIDE_FILES:
                if (Path(side_files_from) / name).is_file():
                    shutil.copy2(Path(side_files_from) / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        # Move an old directory aside before the rename, so one complete copy exists at every moment.
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}") if out_dir.exists() else None
        if old is not None:
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class HFBinCheckpointer:
    """torchtune checkpointer for HF `.bin` directories (Sheared-LLaMA ships as `.bin` shards).

    Args:
        checkpoint_dir: the HF directory to start from (config.json, index and `.bin` shards).
        output_dir: where `save_checkpoint` writes HF directories (`output_dir/<name>`).
        max_shard_size: largest `.bin` file written, in bytes or as '5GB'.
    """

    def __init__(self, checkpoint_dir: str, output_dir: str, max_shard_size: Union[int, str] = "5GB"):
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)
        self._max_shard_size = parse_size(max_shard_size)
        self.config = read_hf_config(self._checkpoint_dir)

    def load_checkpoint(self) -> Dict[str, Any]:
        """`{"model": torchtune state dict}` of the HF directory."""
        return {MODEL_KEY: hf_to_tune(load_hf_state_dict(self._checkpoint_dir), self.config)}

    def save_checkpoint(self, state_dict: Dict[str, Any], name: str = "checkpoint_final") -> Path:
        """Write `state_dict["model"]` (torchtune names) as the HF directory `output_dir/name`."""
        hf_sd = tune_to_hf(state_dict[MODEL_KEY], self.config)
        return save_hf_checkpoint(
            hf_sd,
            self._output_dir / name,
            self.config,
            side_files_from=self._checkpoint_dir,
            max_shard_size=self._max_shard_size,
        )
