"""Config keys as a person types them: the key spelled alike, a value of the wrong shape, an empty
dict that would merge nothing. Shared by the command line's checks and `aelab eval`'s overrides."""
from __future__ import annotations

import difflib
import json

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigTypeError

from .registry import ConfigError


def empty_merge(cfg: DictConfig, key: str, value) -> None:
    """`eval.noise={}` would change nothing: an empty dict merges into a dict and drops none of its
    entries. Said, with the way to drop them, instead of run as if nothing was typed."""
    node = OmegaConf.select(cfg, key)
    if isinstance(value, (dict, DictConfig)) and not value and isinstance(node, DictConfig) and node:
        first = next(iter(node))
        every = ", or every one with eval.noise=null" if key == "eval.noise" else ""
        raise ConfigError(f"{{}} drops nothing: a dict merges into the entries there ({', '.join(map(str, node))}); "
                          f"drop one with ~{key}.{first}{every}", key)


def wrong_shape(error: BaseException | None) -> bool:
    """OmegaConf's refusal to merge a list into a section of settings, or a dict into a list."""
    return isinstance(error, ConfigTypeError) and "Cannot merge" in str(error)


def shape_error(node, key: str, typed, value: str) -> ConfigError:
    """A list where a section of settings goes (eval.noise.gaussian=[1,2]), or a dict where a list
    goes (model.hidden={a:1}), with the shape it takes: `node` is the config's, `typed` the value as
    read and `value` as typed. In a dict typed for a section, the key inside it that has the wrong
    shape (eval={noise:[1]}: eval.noise)."""
    while isinstance(typed, dict) and isinstance(node, DictConfig):
        inner = next((k for k, v in typed.items() if k in node and isinstance(v, (dict, list))), None)
        if inner is None:
            break
        key, node, typed = f"{key}.{inner}", node[inner], typed[inner]
        value = json.dumps(typed, separators=(",", ":"))
    if isinstance(node, DictConfig):
        first = next(iter(leaf_keys(node)), "KEY")  # down to a setting: eval.noise → eval.noise.gaussian.noise_factor
        return ConfigError(f"is a section of settings, not a value; set one of its keys, e.g. {key}.{first}={value}", key)
    if isinstance(node, ListConfig):
        example = json.dumps(OmegaConf.to_container(node), separators=(",", ":"))
        return ConfigError(f"takes a list, e.g. {key}={example}; got {value}", key)
    return ConfigError(f"cannot take {value} (a value of another shape than the config's)", key)


def similar_key(cfg: DictConfig, key: str) -> str | None:
    """The key beside `key` spelled most alike (reg.wieght → reg.weight), or None."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    siblings = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    near = difflib.get_close_matches(name, siblings, n=1)
    return (f"{parent}.{near[0]}" if parent else near[0]) if near else None


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted paths of the settings (the hydra section left out)."""
    paths = []
    for k, value in cfg.items():
        path = f"{prefix}{k}"
        if path == "hydra":
            continue
        paths += leaf_keys(value, f"{path}.") if isinstance(value, DictConfig) else [path]
    return paths
