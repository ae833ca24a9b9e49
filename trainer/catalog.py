"""``flowrl list rewards|models|trainers [NAME]``: what a config can name, from the registries.

Without ``NAME``: one line per registered name (a reward's kind too) with the first line of its
docstring. With ``NAME``: the whole docstring and, for a reward, its options with their defaults
(what a ``rewards:`` entry may set besides ``name``, ``weight``, ``batch_size``, ``device`` and
``dtype``).
"""

from __future__ import annotations

import inspect
import re

SECTIONS = ("rewards", "models", "trainers")
_COMMON = {"device", "dtype"}  # every reward takes them; the entry sets them


def registry(section: str):
    """The registry a config key names: rewards[].reward_model, model.model_type, train.trainer_type."""
    if section == "rewards":
        from shared.rewards import REWARDS

        return REWARDS
    if section == "models":
        from shared.models import MODELS

        return MODELS
    from trainer.algorithms import ALGORITHMS

    return ALGORITHMS


def summary(obj, limit: int = 110) -> str:
    """The first sentence of ``obj``'s own docstring (not one it inherits), else of its module's,
    on one line of at most ``limit`` characters."""
    doc = (obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__) or \
        (inspect.getmodule(obj).__doc__ or "")
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    end = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.\s", text)  # not "et al. " nor "e.g. "
    text = text[:end.start() + 1] if end else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def options(cls) -> list[str]:
    """A reward's own options as ``name=default`` (``name`` alone when required)."""
    out = []
    for name, p in sorted(cls.keyword_options().items()):
        if name in _COMMON:
            continue
        out.append(name if p.default is inspect.Parameter.empty else f"{name}={p.default!r}")
    return out


def table(section: str) -> str:
    """One line per registered name: name, (kind,) summary."""
    reg = registry(section)
    rows = []
    for name in reg.names():
        try:
            obj = reg.get(name)
        except Exception as e:  # noqa: BLE001 - an optional dependency missing: say so, list the rest
            rows.append((name, "", f"(cannot import here: {type(e).__name__}: {e})"))
            continue
        rows.append((name, getattr(obj, "kind", "") if section == "rewards" else "", summary(obj)))
    width = max(len(r[0]) for r in rows)
    kinds = max(len(r[1]) for r in rows)
    return "\n".join(f"{n:<{width}}  {k:<{kinds}}  {s}".rstrip() if kinds else f"{n:<{width}}  {s}".rstrip()
                     for n, k, s in rows)


def describe(section: str, name: str) -> str:
    """``name``'s docstring, and for a reward its kind and options (unknown names: the registry's
    error, with the nearest registered name)."""
    obj = registry(section).get(name)
    parts = [f"{name}: {getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"]
    if section == "rewards":
        parts.append(f"kind: {obj.kind}")
        opts = options(obj)
        parts.append("options: " + (", ".join(opts) if opts else "none"))
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    doc = inspect.cleandoc(own) if own else None
    module_doc = inspect.getdoc(inspect.getmodule(obj))
    for text in (doc, module_doc if module_doc != doc else None):
        if text:
            parts += ["", text]
    return "\n".join(parts)
