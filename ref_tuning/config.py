"""Config checks that run before anything is built: a misspelled key is an error, never ignored."""

import difflib
import inspect
from typing import Iterable, List

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path


class ConfigError(ValueError):
    """A config key that is unknown or malformed; the message names the key and the fix."""


def _unknown_key_message(path: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"unknown config key '{path}{key}': {hint}"


def _check_component(node: DictConfig, path: str, errors: List[str]) -> None:
    try:
        component = _get_component_from_path(node._component_)
    except Exception as e:
        errors.append(f"{path}_component_: cannot import '{node._component_}' ({e})")
        return
    params = inspect.signature(component).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # takes **kwargs: the callee itself must reject what it does not know
    for key in node:
        if key != "_component_" and key not in params:
            errors.append(_unknown_key_message(path, key, [p for p in params if p != "self"]))


def _walk(node, path: str, errors: List[str]) -> None:
    if isinstance(node, DictConfig):
        if "_component_" in node:
            _check_component(node, path, errors)
        for key in node:
            _walk(node._get_node(key), f"{path}{key}.", errors)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _walk(item, f"{path}{i}.", errors)


def validate_config(cfg: DictConfig, known_keys: Iterable[str]) -> None:
    """Raise `ConfigError` listing every unknown top-level key and every argument that a
    `_component_` does not accept, with the closest known name."""
    known_keys = set(known_keys)
    errors = [_unknown_key_message("", key, known_keys) for key in cfg if key not in known_keys]
    try:
        OmegaConf.resolve(OmegaConf.create(OmegaConf.to_container(cfg)))
    except Exception as e:  # a broken ${interpolation}
        errors.append(f"cannot resolve the config: {e}")
    _walk(cfg, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
