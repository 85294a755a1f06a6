"""Registries: strict names, and YAML files ↔ registry entries one to one."""
from pathlib import Path

import pytest
import yaml

import aelab.configs
from aelab.build import GROUPS
from aelab.registry import ConfigError, Registry

CONFIGS = Path(aelab.configs.__file__).parent


def test_duplicate_name_raises():
    r = Registry("thing")

    @r.register
    def a():
        return 1
    with pytest.raises(ValueError, match="duplicate thing 'a'"):
        r.register("a")(lambda: 2)


def test_unknown_name_lists_choices():
    r = Registry("reg")
    for name in ("l1", "kl"):
        r.register(name)(lambda: None)
    with pytest.raises(ConfigError, match=r"unknown reg 'kll'; choose from: kl, l1"):
        r.get("kll")
    with pytest.raises(ConfigError, match=r"unknown reg '\['kl'\]'; choose from: kl, l1"):  # a list, not a name
        r.get(["kl"])


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_yaml_files_and_registry_match(group):
    """Every YAML names a registered entry (presets inherit one); every entry has its own YAML."""
    registry = GROUPS[group]
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONFIGS / group).glob("*.yaml")}
    files = {stem: body.get(group, body) for stem, body in files.items()}  # `# @package _global_` files
    bases = {stem for stem, body in files.items() if "name" in body}
    for stem in bases:
        assert files[stem]["name"] == stem, f"{group}/{stem}.yaml names '{files[stem]['name']}'"
    assert bases == set(registry.names())
    for stem, body in files.items():
        if stem not in bases:  # a preset: inherits a base of the same group through its defaults list
            parents = [d for d in body.get("defaults", []) if isinstance(d, str) and d != "_self_"]
            assert parents and all(p in bases for p in parents), f"{group}/{stem}.yaml has no base"
