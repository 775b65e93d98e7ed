"""Config checks that run before anything is built: a misspelled key, a missing key or a value of
the wrong kind is an error that names the key, never ignored."""

import argparse
import difflib
import functools
import inspect
import os
import sys
from contextlib import contextmanager, suppress
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Type

import torch.distributed as dist
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _get_component_from_path, _merge_yaml_and_cli_args


class ConfigError(ValueError):
    """A config key that is unknown or malformed; the message names the key and the fix."""


def raise_if_any(errors: List[str]) -> None:
    if errors:
        raise ConfigError("invalid config: " + (errors[0] if len(errors) == 1 else "\n  " + "\n  ".join(errors)))


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """torchtune's `config.parse` (its parser and merge, the same steps), with a config it cannot read said in one
    line: a missing file, YAML that does not parse (in the file or an override; where), an override without `=`.
    Only the reading is guarded: what the recipe raises is the recipe's."""

    @functools.wraps(recipe_main)
    def wrapper() -> Any:
        parser = TuneRecipeArgumentParser(
            description=recipe_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        try:
            conf = _merge_yaml_and_cli_args(*parser.parse_known_args())
        except (yaml.YAMLError, OSError, ValueError) as e:
            mark = getattr(e, "problem_mark", None)
            if isinstance(e, yaml.MarkedYAMLError) and mark is not None:
                if mark.name == "<unicode string>":  # an override's value: which one, the message does not say
                    e = f"the override {_unreadable_override()!r}: {e.problem} ({e.context})"
                else:
                    e = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: {e.problem} ({e.context})"
            print(f"error: cannot read the config: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        sys.exit(recipe_main(conf))

    return wrapper


def _unreadable_override() -> Optional[str]:
    for arg in sys.argv[1:]:
        key, eq, value = arg.partition("=")
        try:
            yaml.safe_load(value) if eq and not key.startswith("-") else None
        except yaml.YAMLError:
            return arg
    return None


PEER_FAILED = "ref_tuning/failed"  # in the process group's store: the rank whose known error ended the run


@contextmanager
def one_line_errors(*known: Type[BaseException]) -> Iterator[None]:
    """A known mistake ends the process with its one-line message and exit status 2 on every rank that
    raised it (an error on one rank alone must not be hidden); anything else is a bug and keeps its traceback,
    unless it is what a collective raises on a peer of a rank that failed so: that peer says so in one line."""
    rank = os.environ.get("RANK", "0")
    try:
        yield
    except known as e:
        where = "" if rank == "0" else f" [rank {rank}]"
        print(f"error: {type(e).__name__}: {e}{where}", file=sys.stderr, flush=True)
        _set_failed(rank)
        _end(2)
    except Exception:
        failed = _failed_rank()
        if failed is None:
            raise
        print(f"rank {rank} stopped: rank {failed} failed, with the error above", file=sys.stderr, flush=True)
        _end(2)


def _store() -> Any:
    """The process group's key-value store; torchrun's agent holds it, so it outlives a failed worker."""
    return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None  # no public accessor


def _set_failed(rank: str) -> None:
    with suppress(Exception):  # no store, or the agent gone: the peers then keep their traceback
        _store().set(PEER_FAILED, rank)


def _failed_rank() -> Any:
    try:
        store = _store()
        return store.get(PEER_FAILED).decode() if store is not None and store.check([PEER_FAILED]) else None
    except Exception:
        return None


def _end(code: int) -> None:
    if dist.is_initialized():  # for callers in the same process (tests); a recipe's process ends here
        dist.destroy_process_group()
    sys.exit(code)


def _unknown_key_message(path: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"unknown config key '{path}{key}': {hint}"


def _check_component(node: DictConfig, path: str, errors: List[str]) -> None:
    if node._component_ is None:  # what `key=null` on the command line makes of a component node
        errors.append(f"{path}_component_ is null: '{path[:-1]}' needs a component here")
        return
    try:
        params = inspect.signature(_get_component_from_path(node._component_)).parameters
    except Exception as e:
        errors.append(f"{path}_component_: cannot import '{node._component_}' ({e})")
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # takes **kwargs: the callee itself must reject what it does not know
    for key in node:
        if key != "_component_" and key not in params:
            errors.append(_unknown_key_message(path, key, [p for p in params if p != "self"]))


def is_off(value: Any) -> bool:
    """Null, or a component node whose `_component_` is null (`tune run` makes `key=null` that: it cannot delete one)."""
    return value is None or isinstance(value, (dict, DictConfig)) and value.get("_component_", 0) is None


def _walk(node, path: str, errors: List[str]) -> None:
    if isinstance(node, DictConfig):
        if "_component_" in node:
            _check_component(node, path, errors)
        for key in node:
            _walk(node._get_node(key), f"{path}{key}.", errors)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _walk(item, f"{path}{i}.", errors)


class Kind(NamedTuple):
    """What a top-level key takes: a test of its resolved value, its description, whether it may be left out."""

    accepts: Callable[[Any], bool]
    expected: str
    optional: bool = False

    def or_null(self) -> "Kind":
        return Kind(lambda v: v is None or self.accepts(v), f"{self.expected} or null", optional=True)


def _is_number(v: Any, types=(int, float)) -> bool:
    return isinstance(v, types) and not isinstance(v, bool)


COMPONENT = Kind(lambda v: isinstance(v, dict) and "_component_" in v, "a node with a _component_")
STRING = Kind(lambda v: isinstance(v, str) and v != "", "a non-empty string")
BOOL = Kind(lambda v: isinstance(v, bool), "true or false")
INT = Kind(lambda v: _is_number(v, int), "an integer")
POSITIVE_INT = Kind(lambda v: _is_number(v, int) and v > 0, "a positive integer")
# torch, numpy and random all take it (torchtune's set_seed: 0 to 2**32 - 1, less the ranks, which it adds).
SEED = Kind(lambda v: _is_number(v, int) and 0 <= v <= 2**32 - 1024, "an integer from 0 to 2**32 - 1024")
POSITIVE_NUMBER = Kind(lambda v: _is_number(v) and v > 0, "a positive number")


def one_of(*choices: str) -> Kind:
    return Kind(lambda v: v in choices, "one of " + ", ".join(choices))


def validate_config(cfg: DictConfig, schema: Dict[str, Kind]) -> None:
    """Raise `ConfigError` listing every unknown or missing top-level key, every value not of its
    kind, and every argument that a `_component_` does not accept, with the closest known name."""
    errors = [_unknown_key_message("", key, schema) for key in cfg if key not in schema]
    missing = [key for key, kind in schema.items() if key not in cfg and not kind.optional]
    errors += [f"missing config key '{key}': expected {schema[key].expected}" for key in missing]
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # a broken ${interpolation}
        errors.append(f"cannot resolve the config: {e}")
        values = {}
    for key, value in values.items():
        if key in schema and not schema[key].accepts(None if is_off(value) and schema[key].optional else value):
            errors.append(f"config key '{key}': expected {schema[key].expected}, got {value!r:.80}")
    for key in cfg:
        if not (key in schema and schema[key].optional and is_off(values.get(key))):
            _walk(cfg._get_node(key), f"{key}.", errors)
    raise_if_any(errors)


# Argument types of the command-line tools: a bad value is argparse's one-line error naming the option.
def positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return int(text)


def share(text: str) -> float:
    """A share in [0, 1]."""
    with suppress(ValueError):
        if 0 <= float(text) <= 1:
            return float(text)
    raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
