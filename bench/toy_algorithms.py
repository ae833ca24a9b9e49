"""Compare grpo, grpo-guard, nft and awm on the toy world with equal wall-clock budgets.

Each algorithm trains ``examples/toy/{algorithm}.yaml`` for ``--budget`` seconds of training
time (``train.max_train_seconds``; evaluation time is not counted), evaluating the held-out
test prompts every ``--eval-freq`` epochs. Writes ``bench/results/toy_algorithms_{device}[_{tag}].json``
(every eval point: training seconds, accuracy overall and per category) and rewrites the
section of ``docs/results.md`` between the markers of that name with a table (``--from JSON``
rewrites it from a saved run, e.g. one made on the device machine).

    python bench/toy_algorithms.py --budget 240            # CPU, ~20 min for all four
    python bench/toy_algorithms.py --budget 570 --set-file bench/toy_cfgfree.set  # make demo's protocol, ~45 min
    python bench/toy_algorithms.py --budget 900 --device gpu  # on the device machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import load_config  # noqa: E402
from trainer.loop import train  # noqa: E402

ALGORITHMS = ("grpo", "grpo-guard", "nft", "awm")
ACC = "eval/toy_geneval/accuracy"  # GenEval's overall: the unweighted mean of the category accuracies
PER_IMAGE = "accuracy/per_image"  # the mean over all images (reported in the json, not the table)


def run_one(algorithm: str, budget: float, eval_freq: int, out_dir: Path, extra: list[str]) -> dict:
    overrides = [f"train.max_train_seconds={budget}", "train.max_epochs=100000",
                 f"eval.eval_freq={eval_freq}", f"output_dir={out_dir}", "logging_backend=none",
                 f"run_name=bench_{algorithm}"] + extra
    cfg = load_config(ROOT / "examples" / "toy" / f"{algorithm}.yaml", overrides)
    t0 = time.time()
    summary = train(cfg, quiet=True)
    evals = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if ACC in e]
    points = [{"train_seconds": round(e.get("time/train_seconds", 0.0), 1), "epoch": int(e["epoch"]),
               **{k.removeprefix("eval/toy_geneval/"): round(v, 4) for k, v in e.items()
                  if k.startswith("eval/toy_geneval/")}} for e in evals]
    return {"algorithm": algorithm, "epochs": summary["epochs"], "train_seconds": round(summary["train_seconds"], 1),
            "wall_seconds": round(time.time() - t0, 1), "base_accuracy": points[0]["accuracy"],
            "final_accuracy": points[-1]["accuracy"], "best_accuracy": max(p["accuracy"] for p in points),
            "points": points}


def seconds_to_reach(points: list[dict], target: float) -> float | None:
    return next((p["train_seconds"] for p in points if p["accuracy"] >= target), None)


def markdown(result: dict) -> str:
    runs = result["runs"]
    base = runs[0]["base_accuracy"]
    targets = [round(base + d, 2) for d in (0.1, 0.2, 0.3)]
    head = ("| algorithm | epochs | base acc | final acc | best acc | "
            + " | ".join(f"s to {t:.2f}" for t in targets) + " |")
    lines = [head, "|" + "---|" * (5 + len(targets))]
    for r in runs:
        reach = [seconds_to_reach(r["points"], t) for t in targets]
        lines.append(f"| {r['algorithm']} | {r['epochs']} | {r['base_accuracy']:.3f} | {r['final_accuracy']:.3f} | "
                     f"{r['best_accuracy']:.3f} | " + " | ".join("-" if s is None else f"{s:.0f}" for s in reach) + " |")
    cats = [k for k in runs[0]["points"][-1] if k.startswith("accuracy/") and k != PER_IMAGE]
    lines += ["", "Per-category held-out accuracy, base -> final:", "",
              "| algorithm | " + " | ".join(c.removeprefix("accuracy/") for c in cats) + " |",
              "|" + "---|" * (1 + len(cats))]
    for r in runs:
        first, last = r["points"][0], r["points"][-1]
        lines.append(f"| {r['algorithm']} | " + " | ".join(f"{first[c]:.2f} -> {last[c]:.2f}" for c in cats) + " |")
    return "\n".join(lines)


def update_results_md(section: str, body: str) -> Path:
    path = ROOT / "docs" / "results.md"
    text = path.read_text() if path.exists() else "# Measured results\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per algorithm")
    p.add_argument("--eval-freq", type=int, default=10)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS),
                   help="names of examples/toy/<name>.yaml (any toy recipe, e.g. nft_10min)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default="runs/bench_toy")
    p.add_argument("--set", action="append", default=[], help="extra key=value overrides for every run")
    p.add_argument("--set-file", default=None,
                   help="a file of key=value overrides, one a line (# comments), applied before --set: "
                        "e.g. bench/toy_cfgfree.set, make demo's protocol for every algorithm")
    p.add_argument("--tag", default="", help="suffix of the JSON and docs section names (toy_algorithms_{device}_{tag})")
    p.add_argument("--from", dest="from_json", default=None,
                   help="run nothing: rewrite docs/results.md's table from this JSON (e.g. a device run's)")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(f"wrote {write_section(result)}")
        return
    if args.set_file:
        args.set = read_set_file(Path(args.set_file)) + args.set
    out_dir = Path(args.out_dir).resolve()
    os.chdir(ROOT)  # the toy configs name the shipped asset and data relative to the repository root
    runs = []
    for algorithm in args.algorithms:
        r = run_one(algorithm, args.budget, args.eval_freq, out_dir, args.set)
        print(json.dumps({k: v for k, v in r.items() if k != "points"}), flush=True)
        runs.append(r)
    result = {"benchmark": "toy_algorithms", "device": args.device, "tag": args.tag, "budget_train_seconds": args.budget,
              "eval_freq": args.eval_freq, "overrides": args.set, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "command": "python bench/toy_algorithms.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    out = ROOT / "bench" / "results" / f"{section_name(result)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} and {write_section(result)}")


def read_set_file(path: Path) -> list[str]:
    """The ``key=value`` lines of ``path`` (blank lines and ``#`` comments skipped), in order."""
    if not path.is_file():
        raise SystemExit(f"--set-file {path}: no such file. Fix: give the path of a file of key=value lines.")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    bad = [line for line in lines if line and "=" not in line]
    if bad:
        raise SystemExit(f"--set-file {path}: {bad[0]!r} is not key=value. Fix: one override a line, "
                         f"e.g. train.kl_beta=10.")
    return [line for line in lines if line]


def section_name(result: dict) -> str:
    """``toy_algorithms_{device}`` or, with a tag, ``toy_algorithms_{device}_{tag}``: the JSON's
    file name and the docs section's markers."""
    return f"toy_algorithms_{result['device']}" + (f"_{result['tag']}" if result.get("tag") else "")


def write_section(result: dict) -> Path:
    """``docs/results.md``'s section for ``result``'s device: heading, command, tables."""
    names = ", ".join(r["algorithm"] for r in result["runs"])
    body = (f"### Toy world, {names}: {result['budget_train_seconds']:.0f} s of training each "
            f"({result['device']}" + (f", {result['tag']}" if result.get("tag") else "") + ")\n\n"
            f"`{result['command']}` ({result['machine']}, {result['threads']} threads"
            + (f", {result['gpu']}" if result["gpu"] else "") + "). Held-out test-prompt accuracy "
            "(ODE, fixed seeds) of the toy_geneval verifier, GenEval's overall score (the unweighted mean of "
            "the six category accuracies); seconds count training only. \"s to X\" is the training time of the "
            f"first evaluation (every {result['eval_freq']} epochs, and the last) at or above X, so it is only as "
            "fine as that grid.\n\n" + markdown(result))
    return update_results_md(section_name(result), body)


if __name__ == "__main__":
    main()
