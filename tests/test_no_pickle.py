"""No pickle deserialization anywhere in the project: a pickle executes code while it loads, so a
message, checkpoint or model file must never be read with it.

Scans every Python file of the project (the parse tree, so comments and docstrings do not count)
and every config file, and fails on: importing ``pickle``/``cPickle``/``cloudpickle``/``dill``/
``shelve``/``marshal``/``joblib``; calling ``pickle.load(s)``, ``joblib.load``,
``pandas.read_pickle``, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with
``allow_pickle=True``, ``yaml.load`` with an unsafe loader or ``yaml.unsafe_load``; and the
Celery pickle serializer (the string ``"pickle"`` or ``application/x-python-serialize`` in
code, or ``pickle`` as a word in YAML/TOML/INI/Dockerfile/env files).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__", "runs", ".pytest_cache", "build", "dist"}
THIS = Path(__file__).resolve()

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}
BANNED_CALLS = {"pickle.load", "pickle.loads", "joblib.load", "pandas.read_pickle", "pd.read_pickle",
                "yaml.unsafe_load", "yaml.full_load", "np.load(allow_pickle=True)"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}
PICKLE_STRINGS = {"pickle", "application/x-python-serialize"}
CONFIG_SUFFIXES = {".yml", ".yaml", ".toml", ".ini", ".cfg", ".env", ".json"}
PICKLE_WORD = re.compile(r"\bpickle\b", re.IGNORECASE)


def project_files(suffixes: set[str] | None = None, names: tuple[str, ...] = ()) -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if (suffixes and path.suffix in suffixes) or path.name.startswith(names or ("\0",)):
            out.append(path)
    return out


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``np.load``), or ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, where: str) -> list[str]:
    """Every pickle use in ``source`` (see the module docstring), as ``where:line: what``."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            hits += [f"{where}:{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            hits.append(f"{where}:{line}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            hits.append(f"{where}:{line}: from torch import load (call torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            short = ".".join(name.split(".")[-2:])
            if name in BANNED_CALLS or short in BANNED_CALLS:
                hits.append(f"{where}:{line}: {name}(...)")
            elif short == "torch.load":
                if not _true(_kw(node, "weights_only")):
                    hits.append(f"{where}:{line}: {name}(...) without weights_only=True")
            elif short in ("np.load", "numpy.load") and _true(_kw(node, "allow_pickle")):
                hits.append(f"{where}:{line}: {name}(..., allow_pickle=True)")
            elif short == "yaml.load":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _name(loader).split(".")[-1] in UNSAFE_YAML_LOADERS:
                    hits.append(f"{where}:{line}: yaml.load with an unsafe or default loader")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() in PICKLE_STRINGS:
            hits.append(f"{where}:{line}: the string {node.value!r} (a pickle serializer setting?)")
    return hits


def test_the_scanner_catches_each_pattern():
    bad = '''
import pickle
from cloudpickle import loads
from torch import load
import joblib
x = pickle.loads(b"")
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
app.conf.update(task_serializer="pickle", accept_content=["json", "pickle"])
pandas.read_pickle("f")
'''
    found = violations(bad, "x.py")
    assert len(found) == 14, "\n".join(found)
    ok = '''
"""Docstrings and comments may say pickle."""  # never pickle
torch.load("m.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
app.conf.update(task_serializer="json", accept_content=["json"])
'''
    assert violations(ok, "ok.py") == []


def test_no_pickle_deserialization_in_python_sources():
    files = [p for p in project_files({".py"}) if p.resolve() != THIS]
    assert len(files) > 100, f"scanned only {len(files)} files: is ROOT right? {ROOT}"
    hits = [h for p in files for h in violations(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not hits, "pickle deserialization found (use JSON, safetensors, or torch.load(weights_only=True)):\n" + "\n".join(hits)


def test_no_pickle_serializer_in_config_files():
    files = project_files(CONFIG_SUFFIXES, names=("Dockerfile", "docker-compose", ".env"))
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if PICKLE_WORD.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "pickle in configuration:\n" + "\n".join(hits)
