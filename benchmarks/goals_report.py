"""Issue 11's GPU goals against the results folders of `benchmarks/gpu_check.sh` (their JSON files).

    python benchmarks/goals_report.py gpu_results [more folders] [--json goals.json]

Reads every `*.json` in the folders (the files `speed.py` and `stream_latency.py` write, under any name;
several folders when the steps ran in several calls) and
prints one markdown row per goal: the target, the best measured value and the file it came from, and the
verdict — "met", "not met", or "not measured" when no file holds it. The goals name an H100: the last line
says which GPU the files were measured on, and whether every goal was met there.

- renderer ≥ 1,000 frames/s in fp16 (any path and batch size: "at the best batch size");
- ≤ 4 ms a frame at batch 1 in fp16 (any path);
- peak GPU memory ≤ 6 GB at batch 32 in fp16 (the largest of the batch-32 rows);
- a 10 s clip, audio to frames on the CPU, in ≤ 0.5 s (fp16, any path);
- fp16 ≥ 50 dB and bf16 ≥ 40 dB PSNR against fp32 on the parity inputs;
- streaming: time to the first frame ≤ 150 ms, and the cold start (model files to models on the GPU) ≤ 3 s.

Exit status 0 either way (a report, not a test); 2 when the folders hold no JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9 / 2 ** 30  # the goals' GB in the GiB the benchmarks report


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    best: str  # "max" or "min": which measured value speaks for the goal
    limit: float
    unit: str


GOALS = (
    Goal("renderer fp16, best batch", "≥ 1,000 frames/s", "max", 1000.0, "frames/s"),
    Goal("renderer fp16, batch 1", "≤ 4 ms a frame", "min", 4.0, "ms"),
    Goal("peak GPU memory, fp16 batch 32", "≤ 6 GB", "max", 6 * GB, "GiB"),
    Goal("10 s clip to CPU frames", "≤ 0.5 s", "min", 0.5, "s"),
    Goal("fp16 vs fp32 on the parity inputs", "≥ 50 dB", "min", 50.0, "dB"),
    Goal("bf16 vs fp32 on the parity inputs", "≥ 40 dB", "min", 40.0, "dB"),
    Goal("streaming: time to the first frame", "≤ 150 ms", "min", 150.0, "ms"),
    Goal("cold start: files → models on the GPU", "≤ 3 s", "min", 3.0, "s"),
)
VS_FP32 = re.compile(r"vs our fp32: ([0-9.]+) dB")


def measurements(*folders: Path) -> tuple[dict[str, list[tuple[float, str]]], set[str]]:
    """Goal name → [(value, file name)] from every JSON file in `folders`, and the GPUs they name."""
    found: dict[str, list[tuple[float, str]]] = {goal.name: [] for goal in GOALS}
    gpus: set[str] = set()
    for path in sorted(path for folder in folders for path in folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not a benchmark file (a broken one is reported by its step's log)
        if not isinstance(data, dict):
            continue
        environment = data.get("environment") or {}
        if environment.get("gpu"):
            gpus.add(str(environment["gpu"]))
        for row in data.get("rows") or []:
            _add_row(found, row, path.name)
        for run in data.get("runs") or []:
            if isinstance(run.get("first_frame_s"), (int, float)):
                found["streaming: time to the first frame"].append((1000 * run["first_frame_s"], path.name))
        load = (data.get("cold_start_s") or {}).get("load_models_s")
        if isinstance(load, (int, float)):
            found["cold start: files → models on the GPU"].append((load, path.name))
    return found, gpus


def _add_row(found: dict, row: dict, source: str) -> None:
    section, precision, batch = row.get("section"), row.get("precision"), row.get("batch")
    if section == "renderer" and precision == "fp16":
        if isinstance(row.get("fps"), (int, float)):
            found["renderer fp16, best batch"].append((row["fps"], source))
        if batch == 1 and isinstance(row.get("ms_per_frame"), (int, float)):
            found["renderer fp16, batch 1"].append((row["ms_per_frame"], source))
        if batch == 32 and isinstance(row.get("peak_gib"), (int, float)):
            found["peak GPU memory, fp16 batch 32"].append((row["peak_gib"], source))
    elif section == "clip" and precision == "fp16" and isinstance(row.get("seconds"), (int, float)):
        found["10 s clip to CPU frames"].append((row["seconds"], source))
    elif section == "parity" and precision in ("fp16", "bf16"):
        match = VS_FP32.search(row.get("note") or "")
        if match:
            found[f"{precision} vs fp32 on the parity inputs"].append((float(match.group(1)), source))


def verdicts(found: dict[str, list[tuple[float, str]]]) -> list[dict]:
    """One row per goal: the best value (max or min as the goal says) and whether it meets the limit.
    For the parity goals "min" is the worst measurement: every run must hold them."""
    rows = []
    for goal in GOALS:
        values = found[goal.name]
        if not values:
            rows.append(dict(goal=goal.name, target=goal.target, value=None, unit=goal.unit, file=None,
                             verdict="not measured"))
            continue
        value, source = (max if goal.best == "max" else min)(values)
        met = value >= goal.limit if goal.target.startswith("≥") else value <= goal.limit
        rows.append(dict(goal=goal.name, target=goal.target, value=value, unit=goal.unit, file=source,
                         verdict="met" if met else "not met"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+", help="results folders of benchmarks/gpu_check.sh")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if not any(path for folder in args.folders for path in folder.glob("*.json")):
        print(f"no JSON files in {', '.join(map(str, args.folders))}")  # noqa: T201
        return 2
    found, gpus = measurements(*args.folders)
    rows = verdicts(found)
    print("| goal | target | measured | file | verdict |\n| --- | --- | --- | --- | --- |")  # noqa: T201
    for row in rows:
        value = "" if row["value"] is None else f"{row['value']:.4g} {row['unit']}"
        print(f"| {row['goal']} | {row['target']} | {value} | {row['file'] or ''} | {row['verdict']} |")  # noqa: T201
    gpu = ", ".join(sorted(gpus)) or "an unnamed device"
    every = all(row["verdict"] == "met" for row in rows)
    h100 = any("H100" in name for name in gpus) and len(gpus) == 1
    print(f"\nMeasured on {gpu}: {'every goal met' if every else 'not every goal met'}"  # noqa: T201
          f"{'' if h100 else ' (the goals name an H100)'}.")
    if args.json:
        args.json.write_text(json.dumps(dict(gpus=sorted(gpus), rows=rows, every_goal_met=every,
                                             goals=[asdict(goal) for goal in GOALS]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
