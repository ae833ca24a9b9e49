#!/usr/bin/env bash
# Wheels the device machine lacks (its image has torch, transformers, accelerate, peft, ...; not
# diffusers or pydantic), fetched HERE into .whl/ (git-ignored through .git/info/exclude) for
# run_device.sh to install there with --no-index. The versions are this checkout's .venv's, so the
# device runs the library versions the test suite ran; for Python 3.12, x86-64 (the device's).
#   bash bench/gpu/fetch_wheels.sh        # then: device run with carry [".whl"]
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=""
for p in diffusers transformers peft pydantic pydantic_core pydantic-settings python-dotenv annotated-types \
         typing-inspection typing_extensions regex; do
  PKGS="$PKGS $p==$(version "$p")"
done
PLAT=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT="$PLAT --platform $p"
done
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl $PKGS
ls -la .whl
