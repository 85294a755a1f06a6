"""The command line's overrides, checked before Hydra launches anything: each mistake is one line that
names the key and the fix (Hydra's own reports span many lines, and in a sweep come only as jobs run)."""
from __future__ import annotations

import copy
import itertools
import functools
import re
from pathlib import Path
from typing import Iterator

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ..console import first_line
from ..keys import empty_merge, leaf_keys, shape_error, similar_key, wrong_shape
from ..registry import ConfigError
from ..runs import read_yaml
from .rundirs import MODES, MULTIRUN

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def check(args: list[str]) -> None:
    """Compose the config before Hydra starts, so that a misspelled option, key or override is one
    line naming the key and the fix (Hydra reports them over many lines, in a sweep only once jobs run).
    Every option of a swept group is checked, then every job's values (check_sweep)."""
    printing = any(a in MODES["--cfg"] or a.startswith("--cfg=") for a in args)  # the config, to be used
    args = composing(args)
    if args is None:
        return  # Hydra's own flags (--help, --info, --config-name ...): Hydra reads those itself
    texts = [a for a in args if not a.startswith("-")]  # the overrides, -m left out
    with initialize_config_module("aelab.configs", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        group_options = functools.cache(loader.get_group_options)  # Hydra's look-up is slow: once per key
        parser = OverridesParser.create(config_loader=loader)
        multirun = bool(set(MULTIRUN) & set(args))
        chosen, keys, intervals, typed = [], [], [], []
        for text in texts:
            try:
                override = parser.parse_override(text)
            except HydraException as e:  # OverrideParseException, or the grammar's own syntax error
                raise ConfigError(f"cannot read '{text}': {first_line(e)}; see {GRAMMAR}", text.split("=")[0]) from None
            key, values = override.key_or_group, sweep_values(override)
            if override.is_sweep_override() and not multirun:
                raise ConfigError(f"'{text}' is a sweep: add -m to run one job per value", key)
            options = group_options(key)
            unknown = [v for v in values or ["null"] if v not in options]
            if options and unknown and not override.is_delete():
                raise ConfigError(f"unknown option '{unknown[0]}'; choose from: {', '.join(options)}", key)
            if override.is_interval_sweep():
                intervals.append(key)
            chosen.append(f"{override.get_key_element()}={values[0]}" if override.is_sweep_override() else text)
            keys.append(key)
            single = parser.parse_override(chosen[-1]) if override.is_sweep_override() else override  # its first job's
            typed.append(None if single.is_delete() else single.value())
        top = [key for key in keys if "." not in key and "/" not in key]  # `trainer=3` or `~reg`, say
        try:
            cfg = compose("train", overrides=chosen, return_hydra_config=True)
            base = compose("train") if top else {}  # what those top-level keys were
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise composition_error(e, chosen) from None
        for key, value in zip(keys, typed):
            empty_merge(cfg, key, value)
        for text, key in zip(chosen, keys):
            if text.startswith("+") and not text.startswith("++") and "." not in key and not group_options(key):
                tag_like_a_key(cfg, key)
        for section in top:  # a whole section of settings taken away
            if isinstance(base.get(section), DictConfig) and not isinstance(cfg.get(section), DictConfig):
                node, options = base[section], group_options(section)
                fix = (f"choose one of its options: {', '.join(options)}" if options else
                       f"set one of its keys, e.g. {section}.{next(iter(node), 'KEY')}=VALUE")
                raise ConfigError(f"is a section of settings, not a value; {fix}", section)
        if intervals and "optuna" not in cfg.hydra.sweeper._target_.lower():
            raise ConfigError("interval(...) is a search range for the Optuna sweeper: add hydra/sweeper=optuna "
                              "(pip install 'aelab[sweep]'), or list the values to sweep: a,b,c", intervals[0])
        check_names(cfg, texts if multirun else [])
        if printing and not multirun and chosen:
            from ..build import check as check_values  # the values of the config it prints, as a run checks them
            check_values(cfg, {})
        if multirun:
            check_sweep(cfg, parser, texts)


def tag_like_a_key(cfg: DictConfig, key: str) -> None:
    """`+KEY=VALUE` at the top adds a key nothing reads: a tag that names the run. One spelled like a
    key aelab reads (+epochs, +regg) is that key mistyped, and would train without it: refused."""
    bare = copy.deepcopy(cfg)
    with open_dict(bare):
        bare.pop(key, None)
    near = nearest_key(bare, key)
    if near and not near.endswith(".name"):  # every group has a name: a +name=... tag is no mistyped key
        raise ConfigError(f"no such key (did you mean {near}?); a top-level +KEY=VALUE only names the run, nothing "
                          f"reads it", key)


def check_names(cfg: DictConfig, swept: list[str]) -> None:
    """Names that make paths stay inside their dir: hydra.job.name names the run's log, and each
    override of a sweep (but the excluded keys) names its job's dir."""
    name = str(cfg.hydra.job.name)
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"names the run's log (NAME.log) in its dir; '{name}' would put it outside: give a name "
                          f"without '/'", "hydra.job.name")
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    for text in swept:
        key, _, value = text.partition("=")
        key = key.lstrip("+~")
        if key not in excluded and not key.startswith("hydra") and ".." in value.replace("\\", "/").split("/"):
            raise ConfigError(f"{value} would put a sweep job's dir outside the sweep dir (a job's dir is named by "
                              f"its overrides); give a value without '..'", key)


def varied_keys(hydra_cfg: DictConfig) -> list[str]:
    """The keys a sweep job's sweep varies, as TensorBoard's HParams names them (`reg.weight`; a group's
    choice as `reg.name`): the sweeper's params (an experiment's, Optuna's search space) and the sweep's
    command line (its multirun.yaml). None for a single run, or where the record is unreadable: the
    dashboard then shows its columns by name."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return []
    texts = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    record = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    try:
        if record.is_file():
            texts += read_yaml(record, dict, "hydra.sweep.dir", "")["hydra"]["overrides"]["task"]
        found = OverridesParser.create().parse_overrides(texts)
    except (ConfigError, KeyError, TypeError, HydraException):
        return []
    keys = [o.get_key_element().lstrip("+~") for o in found if o.is_sweep_override()]
    groups = hydra_cfg.runtime.choices
    return list(dict.fromkeys(f"{key}.name" if key in groups else key for key in keys))


def composing(args: list[str]) -> list[str] | None:
    """The overrides and -m of a call that composes aelab's config: a run, a sweep, `--cfg job` or
    `--help` with overrides (the flags left out: the config they print is checked as a run's). None for a
    call with Hydra's other flags (--info, --config-name ...), which Hydra reads itself."""
    kept, flag_value = [], False
    for arg in args:
        if flag_value or arg in ("--resolve", "--help", "-h", *MODES["--cfg"]) or arg.startswith("--cfg="):
            flag_value = arg in MODES["--cfg"]  # its value (job, hydra, all) follows
        elif arg.startswith("-") and arg not in MULTIRUN:
            return None
        else:
            kept.append(arg)
    return kept


def check_sweep(cfg: DictConfig, parser: OverridesParser, texts: list[str]) -> None:
    """Every job of a sweep (every value an Optuna search can sample), checked before the first job."""
    sampled = cfg.hydra.runtime.choices.get("hydra/sweeper") != "basic"
    jobs = sweep_jobs(parser, texts, cfg.hydra.sweeper.get("params"), sampled)
    check_jobs(jobs, "a trial of the search can take" if sampled else "job {} of the sweep")


def sweep_jobs(parser: OverridesParser, texts: list[str], params: DictConfig | None, sampled: bool) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper will make them (the sweeper's params from the
    config, an experiment's say, then the command line's). A sweeper that samples its jobs as it goes
    (Optuna) gets every value of each choice and both ends of each range, one parameter at a time."""
    overrides = parser.parse_overrides([f"{key}={value}" for key, value in (params or {}).items()] + texts)
    if not sampled:  # the cartesian product of the values, the last of a key winning: the basic sweeper's jobs
        values = {o.get_key_element(): [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                  if o.is_sweep_override() else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
                  for o in overrides}
        return [list(job) for job in itertools.product(*values.values())]
    options = {o.get_key_element(): [f"{o.get_key_element()}={v}" for v in sweep_values(o, ends=True) or ["null"]]
               for o in overrides}  # the last of a key wins, as in either sweeper
    first = [values[0] for values in options.values()]
    return [first] + [[value if i == j else f for j, f in enumerate(first)]
                      for i, values in enumerate(options.values()) for value in values[1:]]


def check_jobs(jobs: list[list[str]], which: str) -> None:
    """Every job's values, checked as its run would check them, before the first job starts: a bad
    value in a sweep's fifth job stops the sweep now, not after four jobs have trained. Each job's
    config is composed as Hydra will compose it (about 0.1 s a job)."""
    from ..build import check  # torch: imported here, once a sweep is about to run anyway

    loaded = {}  # each data set the jobs read, once
    for number, job in enumerate(jobs):
        job = [text for text in job if not text.startswith("hydra")]  # where and how it runs: not its values
        try:
            check(compose("train", overrides=job), loaded)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            error = e if isinstance(e, ConfigError) else composition_error(e, job)
            raise ConfigError(f"{error.message} ({which.format(number)}: {' '.join(job)})", error.key) from None


def sweep_values(override: Override, ends: bool = False) -> list[str]:
    """The values an override stands for, as override text ([] for a deletion without a value). An
    Optuna search range stands for its start, or for both its ends."""
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    if override.is_interval_sweep():
        interval = override.value()
        return [str(interval.start), str(interval.end)] if ends else [str(interval.start)]
    return [] if override.value() is None else [override.get_value_element_as_str()]


def composition_error(error: BaseException, chosen: list[str]) -> ConfigError:
    """Hydra's composition error as one line; an unknown key gets a hint where the key is known, a value
    of the wrong shape (a list for a section, a dict for a list) the shape it takes."""
    unknown = re.match(r"Could not override '([^']+)'", str(error))
    cause = error.__cause__
    merge = wrong_shape(cause) and getattr(cause, "full_key", None)
    if not unknown and not merge:
        return ConfigError(first_line(error) + (f" ({first_line(cause)})" if cause else ""))
    key = unknown.group(1) if unknown else cause.full_key
    typed = {c: c.split("=")[0].lstrip("~+") for c in chosen}  # override → its key
    text = max((c for c, k in typed.items() if key == k or key.startswith(f"{k}.")), key=lambda c: len(typed[c]))
    try:
        rest = compose("train", overrides=[c for c in chosen if c != text], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException):  # the rest does not compose either: no hint
        rest = None
    if merge:
        override = OverridesParser.create().parse_override(text)
        return shape_error(rest and OmegaConf.select(rest, key), key, override.value(), override.get_value_element_as_str())
    nested = getattr(cause, "full_key", None)
    if nested and nested.startswith(f"{key}."):  # trainer={a:1}: the unknown key is trainer.a
        key = nested
    owner = rest and option_with_key(rest, key)
    if owner:
        return ConfigError(f"no such key under {owner[0]}={owner[1]}; it is a key of {owner[0]}={owner[2]}: "
                           f"add {owner[0]}={owner[2]}", key)
    near = rest and nearest_key(rest, key)
    if near:  # a key aelab reads, mistyped or misplaced: adding this one (+KEY) would run with nothing reading it
        return ConfigError(f"no such key (did you mean {near}?); aelab train --cfg job lists the keys", key)
    if "." in key and not key.startswith(("paths.", "hydra")):  # a section aelab reads key by key
        return ConfigError("no such key; aelab train --cfg job lists the keys", key)
    return ConfigError(f"no such key; to add a new key, write +{text}", key)


def nearest_key(cfg: DictConfig, key: str) -> str | None:
    """A sibling spelled alike (reg.wieght → reg.weight), else the same name in another section
    (trainer.lr → optim.lr, epochs → trainer.epochs) or in another option of a group (noise_factor →
    corruption.noise_factor, with corruption=gaussian)."""
    near = similar_key(cfg, key)
    if near or key.startswith("hydra"):
        return near
    name = key.rpartition(".")[2]
    found = sorted((path for path in leaf_keys(cfg) if path.rpartition(".")[2] == name), key=lambda p: p.count("."))
    if found and found[0].count(".") == 1:  # a section's own setting, not one nested deeper (eval.noise...)
        return found[0]
    groups = [g for g in cfg.hydra.runtime.choices if isinstance(cfg.get(g), DictConfig)]  # data, model, reg...
    for group, option, node in other_options(cfg, groups):
        if name in node:
            return f"{group}.{name}, with {group}={option}"
    return found[0] if found else None


def other_options(cfg: DictConfig, groups: list[str]) -> Iterator[tuple[str, str, DictConfig]]:
    """(group, option, the group's settings under that option) for each option not chosen in `cfg`."""
    loader = GlobalHydra.instance().config_loader()
    for group in groups:
        for option in loader.get_group_options(group):
            if option != cfg.hydra.runtime.choices.get(group):
                try:
                    node = compose(f"{group}/{option}").get(group)  # the option's file and its defaults
                except (HydraException, OmegaConfBaseException):
                    continue
                if isinstance(node, DictConfig):
                    yield group, option, node


def option_with_key(cfg: DictConfig, key: str) -> tuple[str, str, str] | None:
    """(group, chosen option, another option that has the key) when `key` belongs to another option
    of its group: reg.rho under reg=none is a key of reg=kl."""
    group, _, name = key.partition(".")
    if not name or cfg.hydra.runtime.choices.get(group) is None:
        return None
    absent = object()
    for _, option, node in other_options(cfg, [group]):
        if OmegaConf.select(node, name, default=absent) is not absent:  # a key set to null counts (device.index)
            return group, cfg.hydra.runtime.choices[group], option
    return None
