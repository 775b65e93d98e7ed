"""HF checkpoint directories <-> torchtune state dicts, in torch's and safetensors' own file formats.

`HFBinCheckpointer` is a torchtune checkpointer. Unlike torchtune's `FullModelHFCheckpointer`, it writes
a complete HF model: the hub's file names (`pytorch_model-0000K-of-0000N.bin`), a `config.json` with the
dtype written, and the tokenizer and generation files. Files are read memory-mapped and weights-only
(a tensor's bytes are read only when used), written shard by shard (memory: about one shard), and
appear under their final name only once complete (`atomic_output`).
"""

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ref_tuning.atomic import atomic_output, temporary, write_error
from ref_tuning.checksums import damaged, file_sha256, write_sums

# torchtune is imported where it is used: importing it takes 3 s, and `convert hf-to-hf` does not need it.
MODEL_KEY, ADAPTER_KEY, ADAPTER_CONFIG = "model", "adapter", "adapter_config"  # torchtune.training's
ADAPTER_SUBDIR = "adapter"  # a LoRA run's adapter inside its merged model's directory; `adapter_*` links to it
METADATA_FILE = "ref_tuning.json"  # what made an output directory: step, validation metrics, config
WEIGHT_MAP_FILES = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}
SINGLE_FILES = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}
# Besides the weights, what makes an HF directory usable on its own.
SIDE_FILES = (
    "tokenizer.model tokenizer.json tokenizer_config.json special_tokens_map.json generation_config.json".split()
)
PathLike = str | Path
StateDict = dict[str, torch.Tensor]
Config = dict[str, Any]
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer old transformers versions saved


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file or key and the fix."""


class OutputTensor(NamedTuple):
    """A tensor to write: its name, dtype and shape up front, its data only when `load()` is called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, as `transformers` reads `max_shard_size`; ints are bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB' or '500MB', got {size!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def _some(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(f"'{k}'" for k in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# Reading


def read_hf_config(checkpoint_dir: PathLike) -> Config:
    """Read and sanity-check `config.json` of a LLaMA-family HF directory."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; an HF model directory needs its config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    kind, archs = config.get("model_type"), config.get("architectures") or []
    if kind not in (None, "llama") or not all("Llama" in a for a in archs):
        raise CheckpointError(
            f"{path}: describes a {kind} model ({', '.join(archs)}), not a LLaMA-family one (model_type llama, "
            "LlamaForCausalLM): use the config.json of these weights"
        )
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise CheckpointError(f"{path}: expected a positive integer '{key}', found {config.get(key)!r}")
    d, (heads, kv_heads, _) = config["hidden_size"], _heads(config)
    if d % heads:
        raise CheckpointError(f"{path}: num_attention_heads={heads} does not divide hidden_size={d}; fix the config")
    if heads % kv_heads:
        raise CheckpointError(f"{path}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    return config


def _heads(config: Config) -> tuple[int, int, int]:
    """Attention heads, key/value heads and head dimension."""
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def expected_hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of a `LlamaForCausalLM` with this config, with its shape, in HF's order."""
    d, vocab, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = _heads(config)
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = {f"self_attn.{k}_proj.weight": s for k, s in zip("qkvo", [(q, d), (kv, d), (kv, d), (d, q)])}
    layer.update({f"mlp.{k}_proj.weight": s for k, s in zip(["gate", "up", "down"], [(ff, d), (ff, d), (d, ff)])})
    layer.update({"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def read_tensor_file(path: Path) -> StateDict:
    """The tensors of a `.bin` (torch.save) or `.safetensors` file, memory-mapped. torch's weights-only
    unpickler refuses, before anything runs, a pickle that asks for more than tensors; its errors and
    safetensors' become one error naming the file."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except PermissionError as e:
        raise CheckpointError(
            f"{path}: this user cannot read it ({e.strerror}); make it readable (chmod a+r)"
        ) from None
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, OSError, UnicodeDecodeError...
        blocked = re.search(r"GLOBAL (\S+)", str(e))  # how torch names a global it refused
        if blocked:
            raise CheckpointError(
                f"{path}: refused: its pickle asks for {blocked.group(1)}, which a weights file never needs "
                "(loading it could run code); nothing in it was run"
            ) from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0][:200]
        raise CheckpointError(
            f"{path}: cannot be read, the file is truncated or corrupt ({reason}); copy it again from its source"
        ) from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: expected a dict of parameter name -> tensor")
    return tensors


def _weight_map(checkpoint_dir: PathLike) -> tuple[Path, dict[str, str] | None]:
    """An HF directory's weight-map file (`*.index.json`) and its map, or else its single weights file and None."""
    names = (*WEIGHT_MAP_FILES.values(), *SINGLE_FILES.values())  # a weight map before a single file
    found = [p for p in (Path(checkpoint_dir) / name for name in names) if p.is_file()]
    if not found:
        raise CheckpointError(
            f"{checkpoint_dir}: found no weights; expected {WEIGHT_MAP_FILES['bin']} with its .bin shards, "
            f"{SINGLE_FILES['bin']}, or their safetensors counterparts"
        )
    map_path = found[0]
    if map_path.suffix != ".json":
        return map_path, None
    try:
        weight_map = json.loads(map_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{map_path}: not a JSON object with a 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{map_path}: expected a non-empty 'weight_map' of parameter -> file")
    return map_path, weight_map


def load_hf_state_dict(checkpoint_dir: PathLike, check_sums: bool = True) -> StateDict:
    """Every tensor of an HF directory (`.bin` or safetensors, sharded or not), memory-mapped, in the
    index's order, checking that the index and the shards agree and (`check_sums`) their checksums, if recorded."""
    problem = damaged(Path(checkpoint_dir)) if check_sums else None
    if problem:
        raise CheckpointError(problem)
    map_path, weight_map = _weight_map(checkpoint_dir)
    if weight_map is None:
        return read_tensor_file(map_path)
    tensors: StateDict = {}
    for file_name in dict.fromkeys(weight_map.values()):
        path = map_path.parent / file_name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {map_path.name} but missing")
        in_file = read_tensor_file(path)
        listed = [k for k, f in weight_map.items() if f == file_name]  # a list: the order is the index's
        missing = set(listed) - in_file.keys()
        stray = {k for k in in_file.keys() - set(listed) if not _IGNORED_HF_KEYS.match(k)}
        if missing or stray:
            problem = f"lacks {_some(missing)}, listed" if missing else f"holds {_some(stray)}, not listed"
            raise CheckpointError(f"{path}: {problem} for it in {map_path.name}; the index and the shards disagree")
        tensors.update({k: in_file[k] for k in listed})
    return tensors


def check_hf_tensors(tensors: dict[str, Any], config: Config, where: PathLike) -> None:
    """Every parameter the config implies is there with the implied shape, and nothing else.
    `tensors` maps HF names to anything with a `shape` (a tensor, an `OutputTensor`)."""
    expected = expected_hf_shapes(config)
    found = {k for k in tensors if not _IGNORED_HF_KEYS.match(k)}
    missing, unexpected = expected.keys() - found, found - expected.keys()
    problems = [f"missing parameters {_some(missing)}"] if missing else []
    problems += [f"unexpected parameters {_some(unexpected)}"] if unexpected else []
    for name in sorted(found & expected.keys()):
        if tuple(tensors[name].shape) != expected[name]:
            problems.append(f"'{name}' has shape {tuple(tensors[name].shape)} but config.json implies {expected[name]}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match config.json: " + "; ".join(problems[:5]))


def read_hf_checkpoint(checkpoint_dir: PathLike, check_sums: bool = True) -> tuple[Config, StateDict]:
    """The config and the weights of an HF directory, checked against each other, in the model's order."""
    config = read_hf_config(checkpoint_dir)
    tensors = load_hf_state_dict(checkpoint_dir, check_sums)
    check_hf_tensors(tensors, config, checkpoint_dir)
    return config, {name: tensors[name] for name in expected_hf_shapes(config)}


# ---------------------------------------------------------------------------------------------
# Converting


def _torchtune_conversion(name: str) -> Callable[[StateDict, Config], StateDict]:
    def convert(state_dict: StateDict, config: Config) -> StateDict:
        from torchtune.models import convert_weights

        heads, kv_heads, head_dim = _heads(config)
        kwargs = dict(num_heads=heads, num_kv_heads=kv_heads, dim=config["hidden_size"], head_dim=head_dim)
        return getattr(convert_weights, name)(state_dict, **kwargs)

    return convert


hf_to_tune = _torchtune_conversion("hf_to_tune")  # HF names and rotary layout to torchtune's (q, k permuted)
tune_to_hf = _torchtune_conversion("tune_to_hf")  # its exact inverse: the permutation only moves values


def tensor_sources(state_dict: StateDict) -> list[OutputTensor]:
    """`converted`'s sources from tensors in memory or memory-mapped."""
    return [OutputTensor(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in state_dict.items()]


def converted(
    sources: list[OutputTensor], convert: Callable | None, config: Config, dtype: torch.dtype | None = None
) -> list[OutputTensor]:
    """`sources` renamed and re-laid-out by `convert` (`hf_to_tune`, `tune_to_hf` or None) and cast
    to `dtype`, each converted only when loaded: a writer holds one file's tensors at a time."""
    outputs = []
    for src in sources:
        # Names and shapes come from converting an empty meta tensor: no data is touched.
        meta = {src.name: torch.empty(src.shape, dtype=src.dtype, device="meta")}
        try:
            ((name, new_meta),) = (convert(meta, config) if convert else meta).items()
        except Exception as e:  # torchtune raises a bare Exception for an unknown name
            raise CheckpointError(f"parameter '{src.name}' cannot be converted: {e}") from e
        out_dtype = dtype if dtype is not None and src.dtype.is_floating_point else src.dtype

        def load(src=src, out_dtype=out_dtype):
            tensor = src.load()
            if convert:
                ((_, tensor),) = convert({src.name: tensor}, config).items()
            return tensor.to(out_dtype)

        outputs.append(OutputTensor(name, out_dtype, tuple(new_meta.shape), load))
    return outputs


def load_tune_state_dict(
    checkpoint_dir: PathLike, expected_config: Config | None = None, placeholders: bool = False
) -> StateDict:
    """An HF directory's weights under torchtune's names and layout, checked against its config.json
    (and `expected_config`'s shapes, if given); memory-mapped but for q and k, permuted in memory.
    `placeholders`: tensors of the right shape and dtype but no data, for ranks other than 0 when
    torchtune's `load_from_full_model_state_dict` shards a model: it scatters rank 0's data only."""
    config, tensors = read_hf_checkpoint(checkpoint_dir)
    if expected_config is not None and expected_hf_shapes(config) != expected_hf_shapes(expected_config):
        raise CheckpointError(f"{checkpoint_dir}: its config.json describes a model of another shape than expected")
    if placeholders:  # one element each, broadcast to the shape: no memory, and q and k permuted as views
        tensors = {name: torch.empty((), dtype=t.dtype).expand(t.shape) for name, t in tensors.items()}
    return hf_to_tune(tensors, config)


# ---------------------------------------------------------------------------------------------
# Writing


def save_tensor_file(path: Path, tensors: list[OutputTensor], safetensors: bool = False) -> str:
    """Write `tensors` as one `torch.save` (or safetensors) file, and return its sha256. They are all loaded
    first: unchanged tensors of a memory-mapped source cost no memory, converted ones their size."""
    state = {t.name: t.load().contiguous() for t in tensors}
    # torch.save writes a tensor's whole storage: a view into a larger one gets its own, so that the
    # file holds exactly its tensors' bytes, as the hub's files do.
    state = {name: t if t.untyped_storage().nbytes() == t.nbytes else t.clone() for name, t in state.items()}
    try:
        if safetensors:
            save_file(state, path, metadata={"format": "pt"})  # the format transformers expects
            digest = file_sha256(path)  # read back while in the page cache: safetensors writes by path
            with open(path, "rb") as f:
                _on_disk(f.fileno())
        else:
            # Without CRC-32s: torch.load never checks them, and computing them (miniz, one core) made a
            # conversion 2-6 times as slow as copying the files. Zip tools testing the archive flag them.
            crc32 = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                with _WriteThrough(path, "wb") as f:
                    torch.save(state, f)
                digest = f.sha256.hexdigest()
            finally:
                torch.serialization.set_crc32_options(crc32)
    except (RuntimeError, OSError, SafetensorError) as e:  # torch's writer reports a full disk as a RuntimeError
        raise write_error(path, e) from e
    return digest


def _drop_cached(fd: int, end: int = 0) -> None:
    """Drop the file's pages up to `end` (0: all) from the page cache, first starting the write-back of
    dirty ones (without waiting for it): nothing reads a just-written checkpoint soon."""
    if hasattr(os, "posix_fadvise"):  # not on macOS: there the kernel keeps them
        os.posix_fadvise(fd, 0, end, os.POSIX_FADV_DONTNEED)


def _on_disk(fd: int) -> None:
    """Wait until the file is on disk (so an output is complete when it takes its name), then drop it from the cache."""
    os.fsync(fd)
    _drop_cached(fd)


class _WriteThrough(io.FileIO):
    """A file whose pages are sent to disk as it is written and dropped from the page cache once there, and
    hashed (`sha256`) on the way. Left to the kernel, a 10 GB checkpoint's dirty pages filled memory beside the
    memory-mapped source, and reclaiming them made a conversion twice as slow (`python -m benchmarks convert`).
    Large writes are hashed in a thread beside the write, so that the hash costs no time the disk does not."""

    CHUNK = 256 * 2**20
    _advised = 0

    def __init__(self, *args):
        super().__init__(*args)
        self.sha256 = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1)  # one per file: a pool's threads do not survive a fork

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        hashing = self._hasher.submit(self.sha256.update, view) if len(view) >= 2**20 else None
        if hashing is None:
            self.sha256.update(view)
        n = 0
        while n < len(view):  # all of it: the hash has it all
            n += super().write(view[n:])
        if hashing is not None:
            hashing.result()
        end = self.tell()
        if end - self._advised >= self.CHUNK:
            _drop_cached(self.fileno(), end)
            self._advised = end
        return n

    def close(self) -> None:
        if not self.closed:
            _on_disk(self.fileno())
            self._hasher.shutdown()
        super().close()


def _copy_side_files(src: PathLike, dst: Path) -> None:
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def save_hf_dir(
    tensors: list[OutputTensor],
    out_dir: PathLike,
    config: Config,
    side_files_from: PathLike | None = None,
    max_shard_size: int | str = "5GB",
    safetensors: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    extra_files: dict[str, str] | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete HF directory: shards in the hub layout and their index, `config.json` with
    the dtype written, the side files of `side_files_from`, `extra_files` (name -> text) and what `write_more`
    writes into the folder, all appearing at once. One shard is loaded at a time."""
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype.is_floating_point}
    if len(dtypes) != 1:
        raise CheckpointError(f"expected one floating dtype among the weights, found {sorted(dtypes)}")
    config = dict(config, torch_dtype=dtypes.pop())
    config["dtype"] = config["torch_dtype"]  # transformers >= 4.56 reads `dtype`
    limit, shards = parse_size(max_shard_size), [[]]
    for t in tensors:  # greedy, in order: a new shard when the next tensor would overflow the last
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + t.nbytes > limit:
            shards.append([])
        shards[-1].append(t)
    fmt, stem = ("safetensors", "model") if safetensors else ("bin", "pytorch_model")
    total = sum(t.nbytes for t in tensors)
    with atomic_output(out_dir, overwrite) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {Path(out_dir).name}", disable=not progress)
        tmp.mkdir()
        weight_map, sums = {}, {}
        for k, shard in enumerate(shards, 1):
            name = f"{stem}-{k:05d}-of-{len(shards):05d}.{fmt}"
            sums[name] = save_tensor_file(tmp / name, shard, safetensors)
            bar.update(sum(t.nbytes for t in shard))
            weight_map.update({t.name: name for t in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / WEIGHT_MAP_FILES[fmt]).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if side_files_from is not None:
            _copy_side_files(side_files_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_sums(tmp, sums)
        if write_more is not None:
            write_more(tmp)
        os.chmod(tmp, 0o755)
    bar.close()
    return Path(out_dir)


def save_hf_checkpoint(hf_sd: StateDict, out_dir: PathLike, config: Config, max_shard_size="5GB") -> Path:
    """Write an in-memory HF state dict as an HF directory, replacing `out_dir` atomically."""
    return save_hf_dir(tensor_sources(hf_sd), out_dir, config, max_shard_size=max_shard_size, overwrite=True)


RECIPE_STATE_FILE = "recipe_state/recipe_state.pt"  # under output_dir, where torchtune's recipes resume from


class HFBinCheckpointer:
    """torchtune checkpointer for HF directories (Sheared-LLaMA ships as `.bin` shards): loads
    `checkpoint_dir`, saves HF directories `output_dir/<name>` of `.bin` shards up to `max_shard_size`
    (bytes, or as '5GB'). torchtune's recipes take it in place of `FullModelHFCheckpointer`, with its config
    keys; they resume from the `epoch_{N}` saved with their recipe state, not from `checkpoint_files`. LoRA recipes
    get the merged model and, beside it, the adapter in the PEFT layout."""

    def __init__(
        self,
        checkpoint_dir: str,
        output_dir: str,
        max_shard_size: int | str = "5GB",
        checkpoint_files: list[str] | None = None,
        model_type: str = "LLAMA2",
        recipe_checkpoint: str | None = None,
        resume_from_checkpoint: bool = False,  # should_load_recipe_state's deprecated name
        should_load_recipe_state: bool = False,
        safe_serialization: bool = False,
        adapter_checkpoint: str | None = None,
    ):
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)  # torchtune's async checkpointing reads these two attributes
        self._max_shard_size = parse_size(max_shard_size)
        self._safetensors = safe_serialization
        self.config = read_hf_config(self._checkpoint_dir)
        if model_type != "LLAMA2":
            raise CheckpointError(
                f"checkpointer.model_type: expected LLAMA2 (HFBinCheckpointer converts LLaMA weights only), found "
                f"{model_type!r}; set LLAMA2, or use torchtune's FullModelHFCheckpointer"
            )
        if adapter_checkpoint is not None:  # a resume reads the adapters from the recipe state instead
            raise CheckpointError(
                f"checkpointer.adapter_checkpoint={adapter_checkpoint!r}: LoRA adapters are read from the recipe state "
                "on resume; remove the key"
            )
        if checkpoint_files is not None:  # we read checkpoint_dir's own weight files: they must be the ones named
            entry, weight_map = _weight_map(self._checkpoint_dir)
            found = sorted(set(weight_map.values())) if weight_map else [entry.name]
            if sorted(set(checkpoint_files)) != found:
                raise CheckpointError(
                    f"checkpointer.checkpoint_files {sorted(checkpoint_files)} disagree with {self._checkpoint_dir}, "
                    f"whose weights are {found}; list those, or drop the key (on resume too: keep the base model's)"
                )
        resume = should_load_recipe_state or resume_from_checkpoint
        self._recipe_state = self._output_dir / (recipe_checkpoint or RECIPE_STATE_FILE) if resume else None
        # torchtune's recipes save epoch_N over whatever is there: only a resume may continue another run's epochs.
        earlier = sorted(p.name for p in self._output_dir.glob("epoch_*"))
        earlier += [RECIPE_STATE_FILE.split("/")[0]] if (self._output_dir / RECIPE_STATE_FILE).is_file() else []
        if earlier and not resume:
            raise CheckpointError(
                f"{self._output_dir}: holds {', '.join(earlier)} of an earlier run, which this one would replace; "
                "resume it (resume_from_checkpoint=True), or choose another output_dir"
            )
        if resume and not self._recipe_state.is_file():
            raise CheckpointError(
                f"{self._recipe_state}: not found; resuming needs the recipe state that an intermediate checkpoint"
                " writes. Set checkpointer.recipe_checkpoint to it, or resume_from_checkpoint: false"
            )

    def load_checkpoint(self, rank_zero_only: bool = False) -> dict[str, Any]:
        """`{"model": torchtune state dict}`, checked against config.json. With `rank_zero_only`, in a
        distributed run only rank 0 reads the weights and the others get placeholders: what torchtune's
        `load_from_full_model_state_dict` needs to shard a model. Resuming torchtune's recipes, their state too."""
        from torchtune.utils import get_world_size_and_rank

        placeholders = rank_zero_only and get_world_size_and_rank()[1] != 0
        if self._recipe_state is None:
            return {MODEL_KEY: load_tune_state_dict(self._checkpoint_dir, self.config, placeholders)}
        state = torch.load(self._recipe_state, map_location="cpu", weights_only=True)
        # torchtune counts epochs_run after an epoch ends, then saves that epoch as epoch_{epochs_run - 1}. A LoRA
        # recipe's epoch_N is merged: it resumes from the base model, with the adapters of its recipe state.
        model_dir = self._output_dir / f"epoch_{state['epochs_run'] - 1}"
        model_dir = self._checkpoint_dir if ADAPTER_KEY in state else model_dir
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: not found, but {self._recipe_state} was saved with it; restore it")
        return {**state, MODEL_KEY: load_tune_state_dict(model_dir, self.config, placeholders)}

    def save_config(self, out_dir: PathLike) -> None:
        """config.json and the tokenizer files into `out_dir`: with a step checkpoint's weights,
        what makes an HF directory (`python -m ref_tuning.convert step-to-hf`)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        _copy_side_files(self._checkpoint_dir, Path(out_dir))

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int | None = None,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
        *,
        name: PathLike = "checkpoint_final",
        metadata=None,
    ) -> Path:
        """Write `state_dict["model"]` (torchtune names) as the HF directory `output_dir/name` (an
        absolute `name` is used as it is), with `metadata` as `ref_tuning.json` inside it; or, for torchtune's
        recipes, `output_dir/epoch_{epoch}` and, if intermediate, the rest of `state_dict` as RECIPE_STATE_FILE.
        A LoRA model's adapter (torchtune's ADAPTER_KEY and ADAPTER_CONFIG), in the PEFT layout, goes into that
        directory's `ADAPTER_SUBDIR`, and `adapter_epoch_{epoch}` (or `adapter_final` beside `checkpoint_final`) links
        there: one directory swapped in at once, so that a reader never finds the two from different steps. With
        `adapter_only`, the adapter alone, as `adapter_*`."""
        out = self._output_dir / (name if epoch is None else f"epoch_{epoch}")
        lora = ADAPTER_KEY in state_dict
        adapter_dir = out.with_name(f"adapter_{out.name.removeprefix('checkpoint_')}")
        write_adapter = partial(self._write_peft_adapter, state_dict.get(ADAPTER_KEY), state_dict.get(ADAPTER_CONFIG))
        if lora and adapter_only:
            with atomic_output(adapter_dir, overwrite=True) as tmp:
                write_adapter(tmp)
        if not adapter_only:
            if lora and adapter_dir.is_dir() and not adapter_dir.is_symlink():
                shutil.rmtree(adapter_dir)  # an older layout's own folder: gone, rather than of another step
            tensors = converted(tensor_sources(state_dict[MODEL_KEY]), tune_to_hf, self.config)
            extra = {METADATA_FILE: json.dumps(metadata, indent=2, default=str) + "\n"} if metadata is not None else {}
            side, shards = self._checkpoint_dir, self._max_shard_size
            more = (lambda tmp: write_adapter(tmp / ADAPTER_SUBDIR)) if lora else None
            save_hf_dir(
                tensors, out, self.config, side, shards, self._safetensors, True, extra_files=extra, write_more=more
            )
            if lora:  # a link replaces a link in one step
                link = temporary(adapter_dir)
                link.symlink_to(f"{out.name}/{ADAPTER_SUBDIR}", target_is_directory=True)  # relative: the run may move
                os.replace(link, adapter_dir)
        if intermediate_checkpoint:  # after the model: the recipe state never names a directory not yet written
            with atomic_output(self._output_dir / RECIPE_STATE_FILE, overwrite=True) as tmp:
                torch.save({k: v for k, v in state_dict.items() if k != MODEL_KEY}, tmp)  # adapters too, for resume
        return out if not adapter_only else adapter_dir

    def _write_peft_adapter(self, adapter: StateDict, settings: Config, out_dir: Path) -> None:
        """The adapter in the PEFT layout (`adapter_config.json`, `adapter_model.safetensors`) in the new folder
        `out_dir`, which `peft.PeftModel.from_pretrained` loads onto the base model at `checkpoint_dir`."""
        from torchtune.models.convert_weights import tune_to_peft_adapter_config, tune_to_peft_adapter_weights

        heads, kv_heads, _ = _heads(self.config)
        dims = dict(num_heads=heads, num_kv_heads=kv_heads, dim=self.config["hidden_size"])
        weights = tune_to_peft_adapter_weights(adapter, **dims)
        peft_config = dict(settings, peft_type="LORA", task_type="CAUSAL_LM", bias="none")
        peft_config = tune_to_peft_adapter_config(
            peft_config, base_model_name_or_path=str(self._checkpoint_dir.resolve())
        )
        out_dir.mkdir()
        save_file({name: t.contiguous() for name, t in weights.items()}, out_dir / "adapter_model.safetensors")
        write_sums(out_dir, {"adapter_model.safetensors": file_sha256(out_dir / "adapter_model.safetensors")})
        (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
