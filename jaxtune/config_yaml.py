"""Config text -> raw dicts: YAML 1.2 scalars with the line of every key, and overrides.

Only ``true``/``false`` are booleans (YAML 1.1's ``yes``/``no``/``on``/``off`` stay
strings, so labels like ``[yes, no]`` survive), ``1e-4`` is a float, nothing is read as
a timestamp; the dumper quotes anything either YAML version would not read back as the
same string. :func:`parse_yaml` also returns the line number of each dotted key, so a
bad value is reported as ``file:line``. :func:`set_override` applies one dotted
``section.key=value`` override (the value read as YAML) to the raw dict.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from jaxtune.errors import ConfigError

_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats, and no implicit timestamps."""


class Dumper(yaml.SafeDumper):
    """SafeDumper that quotes anything either YAML 1.1 or 1.2 would not read as a string."""


Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (_BOOL, _FLOAT, "tag:yaml.org,2002:timestamp")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Dumper.yaml_implicit_resolvers = {
    ch: list(rs) for ch, rs in yaml.SafeDumper.yaml_implicit_resolvers.items()
}
for _cls in (Loader, Dumper):
    _cls.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
    _cls.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
Dumper.add_representer(
    list,
    lambda d, v: d.represent_sequence(
        "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, list | dict) for x in v)
    ),
)


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML text; return the data and the line number of every dotted mapping key."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = "; ".join(str(s) for s in (e.context, e.problem) if s)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if not isinstance(n, yaml.MappingNode):
            return
        for k, v in n.value:
            key = f"{prefix}{k.value}"
            if key in lines:
                raise ConfigError(f"{source}:{k.start_mark.line + 1}: duplicate key {key!r}")
            lines[key] = k.start_mark.line + 1
            walk(v, key + ".")

    if node is not None:
        walk(node, "")
    return data, lines


def set_override(raw: dict, arg: str, source: str, origins: dict[str, str]) -> None:
    """Apply one ``section.key=value`` override to the raw nested dict, in place."""
    key, sep, text = arg.partition("=")
    key = key.strip()
    where = f"{source}: override {arg!r}"
    parts = key.split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"{where}: expected section.key=value (e.g. train.steps=100)")
    value, _ = parse_yaml(text, where) if text.strip() else (None, {})
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]
    origins[key] = where
