"""``bench/gpu/models.py`` (issue 4, item 6: every model family on the device) runs end to end in its
``--smoke`` mode on the CPU: for all ten model types the tiny pipeline goes through flowrl's adapter,
one rollout (Flow-SDE, CFG or embedded guidance, condition images, 5-frame videos) and one LoRA
training step, each family's row written with status ok and timings. Smoke numbers measure nothing
and ``--doc`` refuses them; the real run needs the device (``STEPS=models bash bench/gpu/run_device.sh``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu" / "models.py"
MODEL_TYPES = ["sd3-5", "flux1", "flux1-kontext", "z-image", "qwen-image", "qwen-image-edit-plus", "flux2",
               "flux2-klein", "wan2_t2v", "wan2_i2v"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=str(ROOT))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_models") / "gpu_models.json"
    proc = run("--smoke", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_family_rolls_out_and_takes_a_lora_step(smoke):
    assert smoke["bench"] == "gpu_models" and smoke["smoke"] and smoke["device"] == "cpu"
    rows = {r["model_type"]: r for r in smoke["rows"]}
    assert sorted(rows) == sorted(MODEL_TYPES)
    for name, r in rows.items():
        assert r["status"] == "ok", f"{name}: {r.get('error')}\n{r.get('traceback', '')}"
        assert r["rollout_s"] > 0 and r["train_step_s"] > 0 and r["build_s"] > 0, name
        assert r["transformer_params_B"] > 0 and r["trainable_params_M"] > 0, name
        assert r["peak_gib"] == 0.0  # no CUDA
        frames = (5,) if name.startswith("wan2") else ()
        assert r["media_shape"] == [2, *frames, 3, *r["resolution"]], name


def test_every_model_type_registered_has_a_family():
    from shared.models import MODELS

    assert sorted(set(MODELS.names()) - {"tiny"}) == sorted(MODEL_TYPES)


def _module():
    sys.path.insert(0, str(SCRIPT.parent))  # its `from common import ...`
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_models", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (its dataclasses look their module up there)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_doc_refuses_smoke_results_and_fills_the_table_from_device_results(smoke, tmp_path):
    models = _module()
    doc = tmp_path / "models.md"
    doc.write_text(f"intro\n{models.START}\nno numbers yet\n{models.END}\ntail\n")
    with pytest.raises(SystemExit, match="device results only"):
        models.write_doc(smoke, doc)
    device = {**smoke, "smoke": False, "device": "cuda", "gpu": "NVIDIA H200", "max_layers": None, "repeats": 2}
    device["rows"] = [dict(r, rollout_s=1.25, train_step_s=0.5, peak_gib=42.0) for r in smoke["rows"]]
    device["rows"][-1] = {"model_type": "wan2_i2v", "status": "error", "error": "OutOfMemoryError: CUDA out of memory"}
    models.write_doc(device, doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "no numbers yet" not in text
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table) == len(MODEL_TYPES)
    assert "| 1.25 | 0.50 | 42.0 | ok |" in table[0]
    assert "error: OutOfMemoryError" in table[-1]

    # rows of several result files: a family can have several (a failing run, a rerun with another
    # attention kernel); an error row shows its root cause, not the errors it led to
    crash = ("RuntimeError: the child process for sd3-5 exited with 1 before writing a row; first error: "
             "RuntimeError: Expected mha_graph.execute(handle).is_good() to be true\n... Traceback\n"
             "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n\n")
    device["rows"][0] = {"model_type": "sd3-5", "status": "error", "error": crash}
    rerun = {**device, "repeats": 1, "rows": [dict(smoke["rows"][0], attn_backend="_native_flash", rollout_s=2.0)]}
    models.write_doc([device, rerun], doc)
    table = [line for line in doc.read_text().splitlines() if line.startswith("| `sd3-5`")]
    assert len(table) == 2
    assert "error: RuntimeError: Expected mha_graph.execute" in table[0] and "AcceleratorError" not in table[0]
    assert "| 2.00 |" in table[1] and "ok (attention `_native_flash`; 1 repeat (includes CUDA warm-up))" in table[1]


def test_isolated_families_each_run_in_their_own_process_and_a_dead_one_is_a_row(tmp_path):
    # on CUDA each family runs in a child process (a CUDA error poisons a whole process); a child
    # that dies is recorded as that family's error row and the others still run
    out = tmp_path / "gpu_models.json"
    proc = run("--smoke", "--device", "cpu", "--isolate", "--families", "sd3-5", "flux1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model_type"], r["status"]) for r in rows] == [("sd3-5", "ok"), ("flux1", "ok")]
    assert not list(tmp_path.glob("gpu_models.*.json"))  # the children's files are cleaned up

    models = _module()
    with pytest.raises(RuntimeError, match=r"child process for flux1 exited with 2 before writing a row; "
                                           r"first error: .*"):
        models.run_isolated("flux1", ["--smoke", "--device", "cpu", "--no-such-option"], out, timeout=120)
