"""deploy/Dockerfile, deploy/Dockerfile.cpu, .dockerignore, deploy/constraints.txt and
deploy/healthcheck.py, checked without a Docker engine (none runs here): the images cannot be
built in the tests, so what is checked is what the build depends on.
"""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
import tomllib

import pytest

from tests.deploy.composefile import ROOT

DOCKERFILES = ["deploy/Dockerfile", "deploy/Dockerfile.cpu"]


def _instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: relative to the context root, `*` and `?`
    stop at `/`, `**` spans folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: it or a parent folder matches a
    pattern; the last matching pattern wins (``!`` re-includes)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def test_dockerignore_matcher():
    assert _ignored("a/b/__pycache__/x.pyc", ["**/__pycache__/"])
    assert _ignored("x.pem", ["*.pem"]) and not _ignored("deploy/x.pem", ["*.pem"])  # root only, as Docker
    assert not _ignored("runs/x", ["runs/", "!runs/x"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_image_is_pinned(dockerfile):
    froms = [args for op, args in _instructions(dockerfile) if op == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, tag = image.split()[0].partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), \
            f"{dockerfile}: base image {image!r} is not pinned to an exact version tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_non_root_under_tini(dockerfile):
    ops = _instructions(dockerfile)
    users = [args for op, args in ops if op == "USER"]
    assert users, f"{dockerfile} never leaves root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile}: final USER is {users[-1]}"
    last_user = max(i for i, (op, _) in enumerate(ops) if op == "USER")
    assert all(op != "RUN" for op, _ in ops[last_user:]), "RUN after the final USER would run as the app user"
    entrypoint = next(args for op, args in reversed(ops) if op == "ENTRYPOINT")
    assert "tini" in entrypoint, "PID 1 must forward SIGTERM (Celery warm shutdown) and reap children"
    cmd = next(args for op, args in reversed(ops) if op == "CMD")
    assert cmd.startswith('["flowrl"'), "the service is chosen by the command: flowrl ..."


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_paths_exist_and_are_in_the_build_context(dockerfile):
    patterns = _dockerignore()
    for op, args in _instructions(dockerfile):
        if op != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"
            assert not _ignored(source, patterns), f"{dockerfile} copies {source}, which .dockerignore excludes"


def test_both_images_install_the_same_project():
    def copies(path):
        return [args for op, args in _instructions(path) if op in ("COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD")]

    assert copies(DOCKERFILES[0]) == copies(DOCKERFILES[1])
    # compose healthchecks and the k8s readiness probe run /app/deploy/healthcheck.py
    ops = _instructions(DOCKERFILES[0])
    assert ("WORKDIR", "/app") in ops and ("COPY", "deploy/healthcheck.py deploy/healthcheck.py") in ops


def test_dockerignore_keeps_secrets_environments_and_caches_out():
    patterns = _dockerignore()
    for path in [".env", ".venv/bin/python", "runs/toy/checkpoints/x", ".git/HEAD", "shared/__pycache__/a.pyc",
                 ".pytest_cache/v", "flowrl.egg-info/PKG-INFO", "tests/conftest.py", "k8s/base/kustomization.yaml"]:
        assert _ignored(path, patterns), f"{path} would be sent to the build context"
    for path in ["shared/config.py", "assets/toy-sd3", "examples/toy/nft.yaml", "deploy/healthcheck.py",
                 "pyproject.toml", "README.md"]:
        assert not _ignored(path, patterns), f"{path} is needed by the image but excluded"


def test_constraints_pin_every_runtime_dependency():
    """deploy/constraints.txt pins each dependency of pyproject.toml (regenerate it with
    `.venv/bin/python deploy/freeze_constraints.py` after changing dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "deploy/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
            pins[name] = version
    for requirement in project["dependencies"] + project["optional-dependencies"]["ocr"]:  # the images' extras
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in pins, (f"{name} (pyproject.toml) is not pinned in deploy/constraints.txt; run "
                              f"`.venv/bin/python deploy/freeze_constraints.py`")
    installs = [args for path in DOCKERFILES for op, args in _instructions(path)
                if op == "RUN" and args.startswith("pip install -c deploy/constraints.txt")]
    assert installs == ['pip install -c deploy/constraints.txt ".[ocr]"'] * len(DOCKERFILES), installs
    torch_arg = {args.split("=", 1)[1] for path in DOCKERFILES for op, args in _instructions(path)
                 if op == "ARG" and args.startswith("TORCH_VERSION=")}
    assert torch_arg == {pins["torch"]}, f"Dockerfiles install torch {torch_arg}, constraints pin {pins['torch']}"


# --- the healthcheck script the compose file and the reward readiness probe run ------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/auth" and self.headers.get("Authorization") != "Bearer s3cret":
            status = 401
        else:
            status = {"/ok": 200, "/auth": 200, "/down": 503}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"ready": %s}' % (b"true" if status == 200 else b"false"))

    def do_POST(self):  # noqa: N802  (a worker's admin route)
        ok = self.path == "/admin/drain" and self.headers.get("Authorization") == "Bearer s3cret"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"worker": "w", "consuming": false}' if ok else b'{"error": "token"}')

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _check(url: str, token: str | None = None, *extra: str) -> int:
    return _run(url, token, *extra).returncode


def _run(url: str, token: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"} | ({"FLOWRL_API_TOKEN": token} if token else {})
    return subprocess.run([sys.executable, str(ROOT / "deploy/healthcheck.py"), url, "--timeout", "5", *extra],
                          env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_posts_to_a_workers_admin_route(server):
    """The images have no curl and compose publishes no worker port: operations.md drains a sampler
    with ``docker compose exec sampler python deploy/healthcheck.py --post .../admin/drain``."""
    done = _run(f"{server}/admin/drain", "s3cret", "--post")
    assert done.returncode == 0 and '"consuming": false' in done.stdout
    assert _check(f"{server}/admin/drain", None, "--post") == 1


def test_healthcheck_exit_codes(server):
    assert _check(f"{server}/ok") == 0
    assert _check(f"{server}/down") == 1           # 503 while the reward models load
    assert _check(f"{server}/auth") == 1           # the server wants its token
    assert _check(f"{server}/auth", "s3cret") == 0  # ... which comes from FLOWRL_API_TOKEN
    assert _check("http://127.0.0.1:1/none") == 1  # nothing listens
