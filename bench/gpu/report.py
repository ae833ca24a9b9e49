"""The GPU tables of ``docs/performance.md`` (issue 8), written from the ``bench/results/gpu_*.json``
files the device runs left, so every number there comes from a committed result file.

    python bench/gpu/report.py            # rewrite the tables between the markers
    python bench/gpu/report.py --print    # print them instead

Smoke results (``"smoke": true``) and CPU runs are never used. A benchmark with no result file is
listed as not measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- gpu_perf:start -->", "<!-- gpu_perf:end -->"
#: issue 8's targets
SAMPLER_TARGET, STEP_TARGET, EPOCH_TARGET_S, EPOCH_TARGET_GIB = 0.90, 1.15, 30.0, 49.9


def load(pattern: str, results: Path = RESULTS) -> list[tuple[str, dict[str, Any]]]:
    """(file name, payload) of the device results matching ``pattern``, sorted by name."""
    out = []
    for path in sorted(results.glob(pattern)):
        payload = json.loads(path.read_text())
        if not payload.get("smoke") and payload.get("device") == "cuda":
            out.append((path.name, payload))
    return out


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _env(payload: dict[str, Any]) -> str:
    cudnn = payload.get("cudnn_attention")
    return (f"{payload.get('gpu', '?')}, torch {payload.get('torch')}, diffusers {payload.get('diffusers')}"
            + ("" if cudnn is None else f", cuDNN attention kernel {'allowed' if cudnn else 'off'}"))


def section(title: str, pattern: str, script: str, columns: list[str], results: Path,
            missing: str = "") -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """(the section's first lines: its title, then the table header, or a not-measured line when
    no device result matches ``pattern``; the matching results)."""
    lines = [title, ""]
    files = load(pattern, results)
    if not files:
        return lines + [f"Not measured on a GPU yet (`bench/gpu/{script}`){missing}.", ""], []
    return lines + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)], files


def sampler_table(results: Path = RESULTS) -> list[str]:
    lines, files = section("### Sampler throughput (a)", "gpu_sampler_*.json", "sampler.py", [
        "model", "mode", "images / batch", "forward rows", "transformer-only limit (img/s)", "flowrl (img/s)",
        "`sampler_vs_limit`", "VAE decode (s)", "peak GiB", "file"], results)
    if not files:
        return lines
    notes = []
    for name, p in files:
        for r in p["rows"]:
            mode = r.get("mode", "compiled" if p.get("compile") else "eager")
            mode += f" + `{r['variant']}`" if r.get("variant") else ""
            lines.append(f"| {p['model']} | {mode} | "
                         f"{r['batch']} | {r['forward_rows']} | {r['limit_img_s']:.2f} | {r['img_s']:.2f} | "
                         f"**{r['sampler_vs_limit']:.3f}** | {r['decode_s']:.3f} | {r['peak_gib']:.1f} | `{name}` |")
        guidance = f"CFG {p['guidance']} as one batched forward" if p.get("cfg_batched") else \
            f"embedded guidance {p['guidance']}"
        notes.append(f"- `{name}`: {_env(p)}; {p['resolution']} px, {p['steps']} steps, {guidance}, Flow-SDE with "
                     f"log-probs on steps {p['sde_steps'][0]}-{p['sde_steps'][-1]}, bf16"
                     + (f"; `torch.compile` ({p['compile']}) took {p['compile_s']:.0f} s the first call, outside "
                        "the timings" if p.get("compile_s") else "") + ".")
        if p.get("variants"):
            notes.append("  Rows with `+ variant`: the same rollout with each option added on top of the ones "
                         "above it: " + "; ".join(f"`{k}`: {v}" for k, v in p["variants"].items()) + ".")
    return lines + [""] + notes + ["", f"Target: `sampler_vs_limit` >= {SAMPLER_TARGET} against the COMPILED limit "
                                       "(SD3.5-M, 16 images per batch).", ""]


def step_table(results: Path = RESULTS) -> list[str]:
    title = "### One GRPO optimization step over a group (b)"
    lines, files = section(title, "gpu_train_step_*.json", "train_step.py", [
        "model", "algorithm", "batch", "forward rows", "trained steps", "grad. checkpointing", "compile", "flowrl (s)",
        "raw fwd+bwd+AdamW (s)", "`train_step_vs_raw`", "peak GiB (flowrl / raw)", "file"], results)
    if not files:
        return lines
    notes = []
    for name, p in files:
        for r in p["rows"]:
            lines.append(f"| {p['model']} | {r['algorithm']} | {r['batch']} | {r['forward_rows']} | {r['units']} | "
                         f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['compile'] or 'no'} | "
                         f"{r['ours_s']:.3f} | {r['raw_s']:.3f} | **{r['train_step_vs_raw']:.3f}** | "
                         f"{r['ours_peak_gib']:.1f} / {r['raw_peak_gib']:.1f} | `{name}` |")
        notes.append(f"- `{name}`: {_env(p)}; {p['resolution']} px, CFG {p['guidance']} in training, LoRA rank "
                     f"{p['lora_rank']} on {len(p['targets'])} projections ({', '.join(p['targets'])}), "
                     f"{p['mixed_precision']}.")
    return lines + [""] + notes + ["", f"Target: `train_step_vs_raw` <= {STEP_TARGET} in the same mode.", ""]


def steady_note(p: dict[str, Any]) -> str:
    """An epoch result whose median is not of steady epochs says so (one epoch: it includes warm-up
    and compilation; a run stopped by its time limit)."""
    notes = (["first epoch only, not steady"] if p.get("epochs", 0) < 2 else []) + (
        ["stopped by the time limit"] if p.get("stopped_by_time_limit") else [])
    return f" ({'; '.join(notes)})" if notes else ""


def epoch_table(results: Path = RESULTS) -> list[str]:
    lines, files = section("### Whole epochs of the peer's recipe (c, d)", "gpu_epoch_*.json", "epoch.py", [
        "algorithm", "compile", "rollout batch", "images / epoch", "`epoch_s` (steady)", "sample (s)", "train (s)",
        "other (s)", "first epoch (s)", "`peak_gib`", "file"], results,
        missing=": the first device runs ended before an epoch finished (see the status above)")
    if not files:
        return lines
    for name, p in files:
        lines.append(f"| {p['algorithm']} | {p.get('compile') or 'no'} | {p.get('rollout_batch', p['batch'])} | "
                     f"{p['images_per_epoch']} | "
                     f"**{_f(p['epoch_s'], '.1f')}**{steady_note(p)} | {_f(p['sample_s'], '.1f')} | "
                     f"{_f(p['train_s'], '.1f')} | "
                     f"{_f(p['other_s'], '.1f')} | {_f(p['first_epoch_s'], '.1f')} | {p['peak_gib']:.1f} | `{name}` |")
    return lines + ["", f"Target (GRPO): `epoch_s` <= {EPOCH_TARGET_S:.0f} s, `peak_gib` <= {EPOCH_TARGET_GIB}.", ""]


def tables(results: Path = RESULTS) -> str:
    return "\n".join(sampler_table(results) + step_table(results) + epoch_table(results)).rstrip() + "\n"


def write_doc(text: str, path: Path = DOC) -> Path:
    doc = path.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{path} has no {START} / {END} markers")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + text + END + tail)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--print", action="store_true", help="print the tables, write nothing")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    text = tables(Path(args.results))
    if args.print:
        print(text)
    else:
        print(f"wrote {write_doc(text)}")


if __name__ == "__main__":
    main()
