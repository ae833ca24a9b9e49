"""Layering rules, checked statically with ``ast`` (every import anywhere in a file counts,
including function-local and ``TYPE_CHECKING`` ones):

* ``shared/`` is the bottom layer: it never imports ``trainer`` or ``services``;
* ``shared/protocol`` (the wire format) never imports ``torch``, directly or through other
  ``shared`` modules it imports;
* ``services/`` never imports ``trainer``, and one service never imports another
  (``services.reward`` and ``services.sampler`` share code only through ``shared``);
* ``trainer/`` reaches services only through a transport: the one exception is the ``flowrl``
  console (``trainer/cli.py``), which starts a service's own entry point in its process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOTTED_LOADERS = {"import_module", "__import__", "import_dotted", "register"}


def py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def imports_of(path: Path) -> frozenset[tuple[str, int]]:
    """(absolute module name, line) for every import in ``path``; ``from a import b`` yields
    both ``a`` and ``a.b`` (b may be a submodule). Dotted strings passed to import_module /
    registry ``register`` calls count too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod:
                out.add((mod, node.lineno))
            out.update((f"{mod}.{a.name}" if mod else a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DOTTED_LOADERS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "." in arg.value:
                        out.add((arg.value, node.lineno))
    return frozenset(out)


def top(name: str) -> str:
    return name.split(".")[0]


def violations(package: str, forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: imports {name}"
            for path in py_files(package)
            for name, line in sorted(imports_of(path))
            if top(name) in forbidden]


def test_parser_sees_all_import_forms(tmp_path, monkeypatch):
    """The checker itself: absolute, from-, relative, local and string imports are found."""
    pkg = tmp_path / "shared" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "shared" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    src = pkg / "m.py"
    src.write_text(
        "import trainer.loop\n"
        "from services import api\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "def f():\n"
        "    import torch\n"
        "    importlib.import_module('trainer.data')\n"
        "REG.register('x', 'services.foo.Bar')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = {n for n, _ in imports_of(src)}
    assert {"trainer.loop", "services", "services.api", "shared.sub.sibling", "shared.other",
            "shared.other.thing", "torch", "trainer.data", "services.foo.Bar"} <= names


def test_shared_has_python_files():
    assert py_files("shared"), "shared/ has no Python files: the rules below would be vacuous"


def test_shared_never_imports_trainer_or_services():
    bad = violations("shared", {"trainer", "services"})
    assert not bad, "shared/ must not depend on trainer/ or services/:\n" + "\n".join(bad)


def test_services_never_import_trainer():
    if not py_files("services"):
        pytest.skip("no services/ modules yet")
    bad = violations("services", {"trainer"})
    assert not bad, "services/ must not depend on trainer/:\n" + "\n".join(bad)


def test_services_never_import_each_other():
    services = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").is_file())
    assert len(services) >= 2, "services/ lists fewer than two services: the rule would be vacuous"
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
           for service in services for path in py_files(f"services/{service}")
           for name, line in sorted(imports_of(path))
           if name.split(".")[:1] == ["services"] and len(name.split(".")) > 1
           and name.split(".")[1] in services and name.split(".")[1] != service]
    assert not bad, "a service must not import another (share code through shared/):\n" + "\n".join(bad)


#: the trainer's entry points into services: the console starts a service's own main in-process
CONSOLE = {"trainer/cli.py"}


def test_the_trainer_reaches_services_only_through_a_transport():
    bad = [line for line in violations("trainer", {"services"})
           if line.split(":")[0] not in CONSOLE]
    assert not bad, ("trainer/ must reach services through a transport (trainer/transport.py: Celery "
                     "queues, HTTP), not by importing them:\n" + "\n".join(bad))


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _torch_chain(start: Path) -> list[str] | None:
    """Import chain from ``start`` to torch through repository modules, or None."""
    seen: set[Path] = set()
    stack: list[tuple[Path, list[str]]] = [(start, [module_name(start)])]
    while stack:
        path, chain = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, line in imports_of(path):
            if top(name) == "torch":
                return chain + [f"torch (line {line})"]
            parts = name.split(".")
            # importing a.b.c executes a/__init__, a/b/__init__ and a/b/c
            for i in range(1, len(parts) + 1):
                sub = _module_path(".".join(parts[:i]))
                if sub is not None and sub not in seen:
                    stack.append((sub, chain + [".".join(parts[:i])]))
    return None


def protocol_files() -> list[Path]:
    return py_files("shared/protocol") if (ROOT / "shared" / "protocol").is_dir() else []


def test_protocol_never_imports_torch():
    files = protocol_files()
    if not files:
        pytest.skip("shared/protocol has no Python files yet")
    direct = violations("shared/protocol", {"torch"})
    assert not direct, "shared/protocol must not import torch:\n" + "\n".join(direct)
    chains = [" -> ".join(c) for f in files if (c := _torch_chain(f))]
    assert not chains, "shared/protocol reaches torch through:\n" + "\n".join(chains)


def test_protocol_import_does_not_load_torch_at_runtime():
    files = protocol_files()
    if not files:
        pytest.skip("shared/protocol has no Python files yet")
    modules = [module_name(f) for f in files]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing shared.protocol loaded torch"


def test_torch_chain_follows_repository_imports(tmp_path, monkeypatch):
    """The checker itself: torch reached through another repository module is found."""
    for d in ("shared", "shared/protocol", "shared/flow"):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "shared" / "flow" / "sde.py").write_text("import math\nimport torch\n")
    (tmp_path / "shared" / "protocol" / "wire.py").write_text("from shared.flow import sde\n")
    (tmp_path / "shared" / "protocol" / "ok.py").write_text("import json\nfrom . import wire_format\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    chain = _torch_chain(tmp_path / "shared" / "protocol" / "wire.py")
    assert chain[0] == "shared.protocol.wire" and chain[-2:] == ["shared.flow.sde", "torch (line 2)"]
    assert _torch_chain(tmp_path / "shared" / "protocol" / "ok.py") is None
