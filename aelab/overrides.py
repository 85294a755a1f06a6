"""The command line's overrides, checked before Hydra launches anything: each mistake is one line that
names the key and the fix (Hydra's own reports span many lines, and in a sweep come only as jobs run)."""
from __future__ import annotations

import difflib
import re

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .console import first_line
from .registry import ConfigError

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def check(args: list[str]) -> None:
    """Compose the config before Hydra starts, so that a misspelled option, key or override is one
    line naming the key and the fix (Hydra reports them over many lines, in a sweep only once jobs run).
    Every option of a swept group is checked; the other sweeps are composed with their first value."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return  # Hydra's own flags (--help, --cfg, --config-name ...): Hydra reads those itself
    with initialize_config_module("aelab.configs", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        multirun = "-m" in args or "--multirun" in args
        chosen, keys, intervals = [], [], []
        for text in (a for a in args if not a.startswith("-")):
            try:
                override = parser.parse_override(text)
            except HydraException as e:  # OverrideParseException, or the grammar's own syntax error
                raise ConfigError(f"cannot read '{text}': {first_line(e)}; see {GRAMMAR}", text.split("=")[0]) from None
            key, values = override.key_or_group, sweep_values(override)
            if override.is_sweep_override() and not multirun:
                raise ConfigError(f"'{text}' is a sweep: add -m to run one job per value", key)
            options = loader.get_group_options(key)
            unknown = [v for v in values or ["null"] if v not in options]
            if options and unknown and not override.is_delete():
                raise ConfigError(f"unknown option '{unknown[0]}'; choose from: {', '.join(options)}", key)
            if override.is_interval_sweep():
                intervals.append(key)
            chosen.append(f"{override.get_key_element()}={values[0]}" if values else text)
            keys.append(key)
        top = [key for key in keys if "." not in key and "/" not in key]  # `trainer=3` or `~reg`, say
        try:
            cfg = compose("train", overrides=chosen, return_hydra_config=True)
            base = compose("train") if top else {}  # what those top-level keys were
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise composition_error(e, chosen) from None
        for section in top:  # a whole section of settings taken away
            if isinstance(base.get(section), DictConfig) and not isinstance(cfg.get(section), DictConfig):
                node, options = base[section], loader.get_group_options(section)
                fix = (f"choose one of its options: {', '.join(options)}" if options else
                       f"set one of its keys, e.g. {section}.{next(iter(node), 'KEY')}=VALUE")
                raise ConfigError(f"is a section of settings, not a value; {fix}", section)
    if intervals and "optuna" not in cfg.hydra.sweeper._target_.lower():
        raise ConfigError("interval(...) is a search range for the Optuna sweeper: add hydra/sweeper=optuna "
                          "(pip install 'aelab[sweep]'), or list the values to sweep: a,b,c", intervals[0])


def sweep_values(override: Override) -> list[str]:
    """The values an override stands for, as override text ([] for a deletion without a value)."""
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    if override.is_interval_sweep():  # an Optuna search range: its start stands in for it
        return [str(override.value().start)]
    return [] if override.value() is None else [override.get_value_element_as_str()]


def composition_error(error: BaseException, chosen: list[str]) -> ConfigError:
    """Hydra's composition error as one line; an unknown key gets the nearest known keys as a hint."""
    unknown = re.match(r"Could not override '([^']+)'", str(error))
    if not unknown:
        cause = f" ({first_line(error.__cause__)})" if error.__cause__ else ""
        return ConfigError(first_line(error) + cause)
    key = unknown.group(1)
    text = next(c for c in chosen if c.split("=")[0].lstrip("~+") == key)
    parent, _, name = key.rpartition(".")
    try:
        node = compose("train", overrides=[c for c in chosen if c != text], return_hydra_config=True)
        node = OmegaConf.select(node, parent) if parent else node
        siblings = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except (HydraException, OmegaConfBaseException):  # the rest does not compose either: no hint
        siblings = []
    near = difflib.get_close_matches(name, siblings, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""
    return ConfigError(f"no such key{hint}; to add a new key, write +{text}", key)
