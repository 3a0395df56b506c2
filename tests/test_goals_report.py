"""benchmarks/goals_report.py: issue 11's goals scored from gpu_check.sh's JSON, without a GPU.

The committed H200 results are scored as their READMEs report them; a made-up folder checks the rules
(best or worst value per goal, the H100 caveat, a folder without JSON).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("goals_report", ROOT / "benchmarks" / "goals_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def scored(report, folder: Path) -> dict[str, dict]:
    found, _ = report.measurements(folder)
    return {row["goal"]: row for row in report.verdicts(found)}


def test_the_committed_h200_runs(report):
    first = scored(report, RESULTS / "2026-11-26-h200")
    assert first["renderer fp16, best batch"]["verdict"] == "not met"
    assert first["renderer fp16, best batch"]["value"] == pytest.approx(492, abs=1)
    assert first["renderer fp16, batch 1"]["value"] == pytest.approx(3.55, abs=0.01)
    assert first["10 s clip to CPU frames"]["verdict"] == "not met"
    assert first["streaming: time to the first frame"]["value"] == pytest.approx(99.5, abs=0.1)
    assert first["cold start: files → models on the GPU"]["verdict"] == "met"
    second = scored(report, RESULTS / "2026-11-27-h200")
    assert second["renderer fp16, best batch"]["value"] == pytest.approx(1057.2, abs=0.1)
    assert second["renderer fp16, best batch"]["file"] == "run3-speed_compiled_large.json"
    assert second["10 s clip to CPU frames"]["value"] == pytest.approx(0.308, abs=0.001)
    assert second["fp16 vs fp32 on the parity inputs"]["value"] == pytest.approx(54.3)
    assert second["bf16 vs fp32 on the parity inputs"]["value"] == pytest.approx(42.6)
    assert second["peak GPU memory, fp16 batch 32"]["value"] == pytest.approx(2.87, abs=0.01)
    assert second["streaming: time to the first frame"]["verdict"] == "not measured"


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def test_rules_on_a_made_up_folder(report, tmp_path, capsys):
    gpu = {"gpu": "NVIDIA H100 80GB HBM3"}
    rows = [
        dict(section="renderer", precision="fp16", path="fast", batch=1, ms_per_frame=9.0, fps=111.0),
        dict(section="renderer", precision="fp16", path="compiled", batch=1, ms_per_frame=3.2, fps=312.0),
        dict(section="renderer", precision="fp16", path="compiled", batch=64, ms_per_frame=0.8, fps=1250.0),
        dict(section="renderer", precision="fp16", path="fast", batch=32, ms_per_frame=1.2, fps=833.0, peak_gib=5.5),
        dict(section="renderer", precision="bf16", path="fast", batch=32, ms_per_frame=1.2, fps=2000.0, peak_gib=9.0),
        dict(section="clip", precision="fp16", path="compiled", batch=32, seconds=0.41),
        dict(section="parity", precision="fp16", note="PSNR vs golden 55.0 dB; vs our fp32: 55.0 dB, picks 700"),
        dict(section="parity", precision="bf16", note="PSNR vs golden 41.0 dB; vs our fp32: 41.0 dB, picks 3000"),
    ]
    _write(tmp_path, "speed.json", {"environment": gpu, "rows": rows})
    _write(tmp_path, "stream.json", {"environment": gpu, "cold_start_s": {"load_models_s": 1.5},
                                     "runs": [{"first_frame_s": 0.2}, {"first_frame_s": 0.12}]})
    (tmp_path / "notes.json").write_text("not json")  # skipped, not fatal
    goals = scored(report, tmp_path)
    assert {row["verdict"] for row in goals.values()} == {"met"}
    assert goals["renderer fp16, best batch"]["value"] == 1250.0  # fp16 only: the bf16 row does not count
    assert goals["renderer fp16, batch 1"]["value"] == 3.2
    assert goals["peak GPU memory, fp16 batch 32"]["value"] == 5.5
    assert goals["streaming: time to the first frame"]["value"] == pytest.approx(120.0)
    assert report.main([str(tmp_path), "--json", str(tmp_path / "goals.out")]) == 0
    assert "Measured on NVIDIA H100 80GB HBM3: every goal met." in capsys.readouterr().out
    assert json.loads((tmp_path / "goals.out").read_text())["every_goal_met"] is True

    # The worst parity run decides, the largest batch-32 peak too; past a limit is "not met".
    rows += [dict(section="parity", precision="fp16", note="vs our fp32: 49.5 dB"),
             dict(section="renderer", precision="fp16", path="compiled", batch=32, fps=900.0, peak_gib=5.7)]
    _write(tmp_path, "speed.json", {"environment": {"gpu": "NVIDIA H200"}, "rows": rows})
    goals = scored(report, tmp_path)
    assert goals["fp16 vs fp32 on the parity inputs"]["verdict"] == "not met"
    assert goals["peak GPU memory, fp16 batch 32"]["verdict"] == "not met"  # 5.7 GiB > 6 GB
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "not every goal met (the goals name an H100)" in out and "NVIDIA H100 80GB HBM3, NVIDIA H200" in out


def test_several_folders_are_one_run(report, tmp_path, capsys):
    """Steps run in two calls (each with its own results folder) are scored together."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    gpu = {"gpu": "NVIDIA H100 80GB HBM3"}
    _write(first, "speed_kernel.json", {"environment": gpu, "rows": [
        dict(section="renderer", precision="fp16", path="fast", batch=32, fps=700.0, peak_gib=2.9)]})
    _write(second, "speed_compiled_large.json", {"environment": gpu, "rows": [
        dict(section="renderer", precision="fp16", path="compiled", batch=64, fps=1100.0)]})
    found, gpus = report.measurements(first, second)
    goals = {row["goal"]: row for row in report.verdicts(found)}
    assert goals["renderer fp16, best batch"]["value"] == 1100.0
    assert goals["peak GPU memory, fp16 batch 32"]["verdict"] == "met" and gpus == {"NVIDIA H100 80GB HBM3"}
    assert report.main([str(first), str(second)]) == 0
    assert "not every goal met." in capsys.readouterr().out  # the clip and others: not measured


def test_a_folder_without_json(report, tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no JSON files" in capsys.readouterr().out
