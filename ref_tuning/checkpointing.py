"""HF checkpoint directories <-> torchtune state dicts, one tensor at a time.

`HFBinCheckpointer` implements torchtune's checkpointer interface (`load_checkpoint`,
`save_checkpoint`). It differs from torchtune's `FullModelHFCheckpointer` where Rho-1 needs it to:
it writes the hub's file names (`pytorch_model-0000K-of-0000N.bin`), a `config.json` whose dtype is
the dtype actually written, and copies the tokenizer and generation files, so that the output
directory is a complete HF model. Reading and writing stream tensor by tensor (`tensorfiles`), and
every output appears under its final name only once complete (`atomic_output`).
"""

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from tqdm import tqdm

from ref_tuning.tensorfiles import TensorFileError, TensorRef, open_writer, read_refs

# torchtune is imported where it is used: importing it takes 3 s (torchao, torch._dynamo), as long as
# copying a gigabyte, and `convert hf-to-hf` does not need it.
MODEL_KEY = "model"  # torchtune.training.MODEL_KEY
METADATA_FILE = "ref_tuning.json"  # what made an output directory: step, validation metrics, config

INDEX_FILES = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}
SINGLE_FILES = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}
# Everything besides the weights that makes an HF directory usable on its own.
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer old transformers versions saved


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file or key and the fix."""


class OutputTensor(NamedTuple):
    """A tensor to write: its name, dtype and shape up front, its data only when `load()` is called.
    `load(scratch)` may read into `scratch`, a flat uint8 tensor of at least `source_nbytes`."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    load: Callable[[Optional[torch.Tensor]], torch.Tensor]
    source_nbytes: int = 0
    copy_of: Optional[TensorRef] = None  # a file region holding exactly these bytes, if any

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


def parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5e9 bytes, as `transformers` reads `max_shard_size`; ints are bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB' or '500MB', got {size!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


# ---------------------------------------------------------------------------------------------
# Reading


def read_hf_config(checkpoint_dir: Union[str, Path]) -> Dict[str, Any]:
    """Read and sanity-check `config.json` of a LLaMA-family HF directory."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; an HF model directory needs its config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    kind = config.get("model_type"), config.get("architectures")
    if kind[0] not in (None, "llama") or not all("Llama" in a for a in kind[1] or []):
        raise CheckpointError(f"{path}: describes a {kind[0]} model ({', '.join(kind[1] or [])}), not a LLaMA-family "
                              "one (model_type llama, LlamaForCausalLM): use the config.json of these weights")  # fmt: skip
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise CheckpointError(f"{path}: expected a positive integer '{key}', found {config.get(key)!r}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if config["hidden_size"] % heads:
        raise CheckpointError(
            f"{path}: num_attention_heads={heads} does not divide hidden_size={config['hidden_size']}; "
            "fix the config to match the weights"
        )
    if heads % kv_heads:
        raise CheckpointError(f"{path}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    return config


def expected_hf_shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of a `LlamaForCausalLM` with this config, with its shape, in HF's order."""
    d, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, d),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, d),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, d),
            p + "self_attn.o_proj.weight": (d, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def hf_tensor_refs(checkpoint_dir: Union[str, Path]) -> Dict[str, TensorRef]:
    """Where each tensor of an HF directory lies (`.bin` or safetensors, sharded or not), checking
    that the index and the shards agree; no tensor data is read."""
    checkpoint_dir = Path(checkpoint_dir)
    for fmt, index_name in INDEX_FILES.items():
        index_path = checkpoint_dir / index_name
        if index_path.is_file():
            return _indexed_refs(index_path)
    for single in SINGLE_FILES.values():
        if (checkpoint_dir / single).is_file():
            return _file_refs(checkpoint_dir / single)
    raise CheckpointError(
        f"{checkpoint_dir}: found no weights; expected {INDEX_FILES['bin']} with its .bin shards, "
        f"{SINGLE_FILES['bin']}, or their safetensors counterparts"
    )


def _file_refs(path: Path) -> Dict[str, TensorRef]:
    try:
        return read_refs(path)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from e


def _indexed_refs(index_path: Path) -> Dict[str, TensorRef]:
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a JSON object with a 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' of parameter -> file")
    refs: Dict[str, TensorRef] = {}
    for file_name in dict.fromkeys(weight_map.values()):
        path = index_path.parent / file_name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {index_path.name} but missing")
        file_refs = _file_refs(path)
        listed = [k for k, f in weight_map.items() if f == file_name]  # a list: the order is the index's
        if set(listed) - file_refs.keys():
            raise CheckpointError(
                f"{index_path}: lists {_some(set(listed) - file_refs.keys())} in {file_name}, which does not "
                "hold them; the index and the shards disagree"
            )
        stray = {k for k in file_refs.keys() - set(listed) if not _IGNORED_HF_KEYS.match(k)}
        if stray:
            raise CheckpointError(
                f"{path}: holds {_some(stray)}, which {index_path.name} does not list there; "
                "the index and the shards disagree"
            )
        refs.update({k: file_refs[k] for k in listed})
    return refs


def _some(names, n: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(f"'{k}'" for k in names[:n]) + more


def check_hf_tensors(refs: Dict[str, Any], config: Dict[str, Any], where: Union[str, Path]) -> None:
    """Every parameter the config implies is there with the implied shape, and nothing else.
    `refs` maps HF names to anything with a `shape` (`TensorRef`, `OutputTensor`, a tensor)."""
    expected = expected_hf_shapes(config)
    found = {k for k in refs if not _IGNORED_HF_KEYS.match(k)}
    problems = []
    if expected.keys() - found:
        problems.append(f"missing parameters {_some(expected.keys() - found)}")
    if found - expected.keys():
        problems.append(f"unexpected parameters {_some(found - expected.keys())}")
    for name in sorted(found & expected.keys()):
        if tuple(refs[name].shape) != expected[name]:
            problems.append(
                f"'{name}' has shape {tuple(refs[name].shape)} but config.json implies {expected[name]}"
            )
    if problems:
        raise CheckpointError(f"{where}: weights do not match config.json: " + "; ".join(problems[:5]))


# ---------------------------------------------------------------------------------------------
# Converting


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
    from torchtune.models import convert_weights

    return convert_weights.hf_to_tune(hf_sd, **_conversion_args(config))


def tune_to_hf(tune_sd: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The inverse of `hf_to_tune`: exact, since the permutation only moves values."""
    from torchtune.models import convert_weights

    return convert_weights.tune_to_hf(tune_sd, **_conversion_args(config))


# dtype, shape, load(scratch), and the file region it is read from (None for tensors in memory)
Source = Tuple[torch.dtype, Tuple[int, ...], Callable[[Optional[torch.Tensor]], torch.Tensor], Optional[TensorRef]]
# torchtune's convert_weights permutes exactly these (the per-head rotary layout); it only renames the rest.
_PERMUTED = re.compile(r".*\b(q_proj|k_proj)\.weight$")


def converted(
    sources: Dict[str, Source],
    convert: Optional[Callable[[Dict[str, torch.Tensor], Dict[str, Any]], Dict[str, torch.Tensor]]],
    config: Dict[str, Any],
    dtype: Optional[torch.dtype] = None,
) -> List[OutputTensor]:
    """The tensors to write, renamed and re-laid-out by `convert` (`hf_to_tune`, `tune_to_hf` or
    None) and cast to `dtype`, each converted only when it is written."""
    outputs = []
    for name, (src_dtype, shape, load, ref) in sources.items():
        # Names and shapes come from converting an empty meta tensor: no data is touched.
        meta = {name: torch.empty(shape, dtype=src_dtype, device="meta")}
        try:
            ((new_name, new_meta),) = (convert(meta, config) if convert else meta).items()
        except Exception as e:  # torchtune raises a bare Exception for an unknown name
            raise CheckpointError(f"parameter '{name}' cannot be converted: {e}") from e
        out_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype

        def load_converted(scratch=None, name=name, load=load, out_dtype=out_dtype):
            tensor = load(scratch)
            if convert:
                ((_, tensor),) = convert({name: tensor}, config).items()
            return tensor.to(out_dtype)

        source_nbytes = src_dtype.itemsize * int(torch.Size(shape).numel())
        # Bytes that neither the conversion nor the cast changes are copied from file to file.
        unchanged = out_dtype == src_dtype and not (convert and _PERMUTED.match(name))
        copy_of = ref if unchanged and ref is not None and ref.is_whole_storage else None
        outputs.append(OutputTensor(new_name, out_dtype, tuple(new_meta.shape), load_converted, source_nbytes, copy_of))
    return outputs


def ref_sources(refs: Dict[str, TensorRef]) -> Dict[str, Source]:
    """`converted` sources that read each tensor from its file."""
    return {name: (ref.dtype, tuple(ref.shape), ref.load, ref) for name, ref in refs.items()}


def memory_sources(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Source]:
    """`converted` sources from tensors already in memory."""
    return {name: (t.dtype, tuple(t.shape), (lambda scratch=None, t=t: t), None) for name, t in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_output(target: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` once the block completes.

    A crash (even SIGKILL) leaves `target` as it was: absent, or the complete old version. Temporary
    paths of dead processes from earlier crashes are removed on the next write to the same target.
    `target` is checked for existence before the work, so a refused overwrite costs nothing.
    """
    target = Path(target)
    if target.parent.is_dir():
        _remove_stale_temporaries(target)  # first: it may put back an old version
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists; choose another output or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if not target.is_dir() or tmp.is_file():
            os.replace(tmp, target)  # atomic for a new name and for a file over a file
        elif not _exchange(tmp, target):  # a directory over a directory: swap them in one step
            # No atomic swap here (not Linux, or the file system lacks it): move the old one aside
            # first; if we die in between, the next write to this target puts it back.
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
    finally:
        _remove(tmp)  # after a swap, the old version


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _remove_stale_temporaries(target: Path) -> None:
    """Remove what dead writers left beside `target`; an old version moved aside is put back if
    its writer died before the new one took its place."""
    for path in sorted(target.parent.glob(f".{target.name}.*-*-*")):
        match = re.fullmatch(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]+", path.name)
        if not match or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            os.replace(path, target)
        else:
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_tensor_file(path: Path, tensors: List[OutputTensor], progress: Optional[tqdm] = None,
                      direct_io: bool = True) -> None:  # fmt: skip
    """Write `tensors` into one file (format by suffix), loading and converting one at a time.

    Tensors whose bytes do not change are read from their source file straight into the writer's
    buffers, their recorded checksum checked on the way (a mismatch fails the write before the file
    is used). The other tensors are read, converted and written, a second thread preparing tensor
    i+1 while tensor i is written; it reads into two scratch buffers used in turn, so memory stays
    at a few tensors and no page is faulted twice. `direct_io`: see `tensorfiles.OutputFile`.
    """
    with open_writer(path, {t.name: (t.dtype, t.shape) for t in tensors}, direct_io) as writer, \
            ThreadPoolExecutor(1) as loader:  # fmt: skip
        copied = [t.copy_of is not None and writer.can_copy(t.copy_of) for t in tensors]
        size = max((t.source_nbytes for t, c in zip(tensors, copied) if not c), default=0)
        scratch = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
        to_load = iter([i for i, c in enumerate(copied) if not c])

        def prefetch(slot: int):
            i = next(to_load, None)
            return None if i is None else loader.submit(tensors[i].load, scratch[slot])

        pending, slot = prefetch(0), 0
        for t, copy in zip(tensors, copied):
            if copy:
                writer.copy(t.name, t.copy_of)
            else:
                tensor = pending.result()
                slot = 1 - slot  # the other buffer's tensor was written already
                pending = prefetch(slot)
                writer.write(t.name, tensor)
                del tensor
            if progress is not None:
                progress.update(t.nbytes)


def _plan_shards(tensors: List[OutputTensor], max_shard_size: int) -> List[List[OutputTensor]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    shards: List[List[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def _dtype_name(tensors: List[OutputTensor]) -> str:
    dtypes = {t.dtype for t in tensors if t.dtype.is_floating_point}
    if len(dtypes) != 1:
        raise CheckpointError(f"expected one floating dtype among the weights, found {sorted(map(str, dtypes))}")
    return str(dtypes.pop()).removeprefix("torch.")


def save_hf_dir(
    tensors: List[OutputTensor],
    out_dir: Union[str, Path],
    config: Dict[str, Any],
    side_files_from: Optional[Union[str, Path]] = None,
    max_shard_size: Union[int, str] = "5GB",
    safetensors: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    direct_io: bool = True,
    extra_files: Optional[Dict[str, str]] = None,
) -> Path:
    """Write a complete HF directory: shards in the hub layout and their index, `config.json` with
    the dtype written, the side files (tokenizer, generation config) of `side_files_from`, and
    `extra_files` (name -> text), all appearing at once."""
    fmt = "safetensors" if safetensors else "bin"
    shards = _plan_shards(tensors, parse_size(max_shard_size))
    total = sum(t.nbytes for t in tensors)
    config = dict(config, torch_dtype=_dtype_name(tensors))
    config["dtype"] = config["torch_dtype"]  # transformers >= 4.56 reads `dtype`
    with atomic_output(out_dir, overwrite) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {Path(out_dir).name}", disable=not progress)
        tmp.mkdir()
        weight_map = {}
        stem = "pytorch_model" if fmt == "bin" else "model"
        names = [f"{stem}-{k:05d}-of-{len(shards):05d}.{fmt}" for k in range(1, len(shards) + 1)]
        # One shard after the other: with direct I/O one stream already keeps the disk busy (two at
        # a time measured the same, 7.1-7.8 s against 7.1-7.4 s for 10.8 GB, in more memory).
        for name, shard in zip(names, shards):
            write_tensor_file(tmp / name, shard, bar, direct_io)
            weight_map.update({t.name: name for t in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILES[fmt]).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if side_files_from is not None:
            for name in SIDE_FILES:
                if (Path(side_files_from) / name).is_file():
                    shutil.copy2(Path(side_files_from) / name, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.chmod(tmp, 0o755)
    bar.close()
    return Path(out_dir)


def load_hf_state_dict(checkpoint_dir: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """All tensors of an HF directory, read weights-only (never unpickling code)."""
    return {name: ref.load() for name, ref in hf_tensor_refs(checkpoint_dir).items()}


def save_hf_checkpoint(
    hf_sd: Dict[str, torch.Tensor],
    out_dir: Union[str, Path],
    config: Dict[str, Any],
    side_files_from: Optional[Union[str, Path]] = None,
    max_shard_size: Union[int, str] = "5GB",
) -> Path:
    """Write an in-memory HF state dict as an HF directory, replacing `out_dir` atomically."""
    tensors = converted(memory_sources(hf_sd), None, config)
    return save_hf_dir(tensors, out_dir, config, side_files_from, max_shard_size, overwrite=True)


class LazyStateDict(Mapping):
    """A state dict whose tensors are read and converted when accessed, one at a time, never kept.

    With `placeholders`, tensors are uninitialized memory of the right shape and dtype, never read:
    for ranks other than 0 when torchtune's `load_from_full_model_state_dict` shards the model, since
    its `distribute_tensor` scatters rank 0's data and ignores the other ranks' (`src_data_rank=0`).
    So one process reads the checkpoint, and none holds all of it.
    """

    def __init__(self, tensors: List[OutputTensor], placeholders: bool = False):
        self._tensors = {t.name: t for t in tensors}
        self._placeholders = placeholders

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        return torch.empty(t.shape, dtype=t.dtype) if self._placeholders else t.load(None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_tune_state_dict(checkpoint_dir: Union[str, Path], expected_config: Optional[Dict[str, Any]] = None,
                         placeholders: bool = False) -> LazyStateDict:  # fmt: skip
    """An HF directory's weights under torchtune's names and layout, checked against its config.json
    (and against `expected_config`'s shapes, if given), each read when accessed (see `LazyStateDict`)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_hf_config(checkpoint_dir)
    if expected_config is not None and expected_hf_shapes(config) != expected_hf_shapes(expected_config):
        raise CheckpointError(f"{checkpoint_dir}: its config.json describes a model of another shape than expected")
    refs = hf_tensor_refs(checkpoint_dir)
    check_hf_tensors(refs, config, checkpoint_dir)
    ordered = {name: refs[name] for name in expected_hf_shapes(config)}
    return LazyStateDict(converted(ref_sources(ordered), hf_to_tune, config), placeholders)


class HFBinCheckpointer:
    """torchtune checkpointer for HF directories (Sheared-LLaMA ships as `.bin` shards).

    Args:
        checkpoint_dir: the HF directory to start from (config.json, index and shards).
        output_dir: where `save_checkpoint` writes HF directories (`output_dir/<name>`).
        max_shard_size: largest weight file written, in bytes or as '5GB'.
        safetensors: write safetensors shards instead of `.bin`.
    """

    def __init__(
        self, checkpoint_dir: str, output_dir: str, max_shard_size: Union[int, str] = "5GB", safetensors: bool = False
    ):
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)
        self._max_shard_size = parse_size(max_shard_size)
        self._safetensors = safetensors
        self.config = read_hf_config(self._checkpoint_dir)

    def load_checkpoint(
        self, checkpoint_dir: Optional[Union[str, Path]] = None, rank_zero_only: bool = False
    ) -> Dict[str, Any]:
        """`{"model": torchtune state dict}` of `checkpoint_dir` (default: the one configured),
        checked against config.json, its tensors read lazily (`LazyStateDict`). With
        `rank_zero_only`, in a distributed run only rank 0 reads them and the others get placeholders:
        what torchtune's `load_from_full_model_state_dict` needs to shard a model."""
        checkpoint_dir = Path(checkpoint_dir or self._checkpoint_dir)
        from torchtune.utils import get_world_size_and_rank

        not_rank_zero = get_world_size_and_rank()[1] != 0
        state = load_tune_state_dict(checkpoint_dir, self.config, placeholders=rank_zero_only and not_rank_zero)
        return {MODEL_KEY: state}

    def save_config(self, out_dir: Union[str, Path]) -> None:
        """config.json and the tokenizer files into `out_dir`: with a step checkpoint's weights,
        what makes an HF directory (`python -m ref_tuning.convert step-to-hf`)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        for name in SIDE_FILES:
            if (self._checkpoint_dir / name).is_file():
                shutil.copy2(self._checkpoint_dir / name, out_dir / name)

    def save_checkpoint(
        self, state_dict: Dict[str, Any], name: Union[str, Path] = "checkpoint_final",
        metadata: Optional[Dict[str, Any]] = None,
    ) -> Path:  # fmt: skip
        """Write `state_dict["model"]` (torchtune names) as the HF directory `output_dir/name` (an
        absolute `name` is used as it is), with `metadata` as `ref_tuning.json` inside it."""
        tensors = converted(memory_sources(state_dict[MODEL_KEY]), tune_to_hf, self.config)
        extra = {METADATA_FILE: json.dumps(metadata, indent=2, default=str) + "\n"} if metadata is not None else None
        return save_hf_dir(
            tensors,
            self._output_dir / name,
            self.config,
            side_files_from=self._checkpoint_dir,
            max_shard_size=self._max_shard_size,
            safetensors=self._safetensors,
            overwrite=True,
            extra_files=extra,
        )
