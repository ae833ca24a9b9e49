"""Reading docker-compose files the way Docker Compose does, for the tests (no engine here).

* :func:`load` parses YAML with the ``!reset`` / ``!override`` tags of the Compose
  Specification (PyYAML resolves anchors and ``<<`` merge keys, as compose does);
* :func:`merge` applies an override file: mappings merge key by key, everything else is
  replaced, ``!reset`` removes the key, ``!override`` replaces a mapping whole. That is
  compose's rule for mappings and scalars; sequences it sometimes appends instead, so
  :func:`sequence_paths` lets a test assert an override sets none but the replaced ones;
* :func:`interpolate` expands ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
  ``${VAR:?error}``, ``${VAR?error}`` and ``$$`` in every string, with a given environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


class Reset:
    """``!reset``: remove the key from the merged result."""


class Override:
    def __init__(self, value: Any) -> None:
        self.value = value


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: Reset())


def _override(loader, node):
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


_Loader.add_constructor("!override", _override)


def load(path: str | Path) -> dict:
    return yaml.load(Path(ROOT, path).read_text(), Loader=_Loader)  # noqa: S506 (SafeLoader subclass)


def _strip(value: Any) -> Any:
    """Drop tag markers from a value that has nothing to merge into."""
    if isinstance(value, Override):
        return _strip(value.value)
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def merge(base: Any, override: Any) -> Any:
    if isinstance(override, Override):
        return _strip(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = _strip(value)
        return out
    return _strip(override)


def sequence_paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every sequence value in ``node`` (not descending into sequences)."""
    if isinstance(node, list):
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in sequence_paths(v, path + (k,))]
    return []


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(ValueError):
    pass


def _expand(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return _expand(arg, env) if unset else value
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return "" if value is None else value

    return _VAR.sub(sub, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return _expand(node, env)
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return node


def environment(service: dict) -> dict[str, str]:
    """A service's ``environment`` as a dict (compose accepts a mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}
