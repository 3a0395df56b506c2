"""`python -m imtalker_core batch JOBS.csv`: the job list and its checks, claims, resuming, failures, and a
two-process torchrun launch (gloo, CPU). Small random models keep it quick: the renderer's official structure at
128², a narrow generator and a one-layer wav2vec2; speech of 0.2 s (5 frames) and driving clips of 3 frames."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imtalker_core import batch_jobs, cli, runner
from imtalker_core.batch_jobs import BUSY, SIBLING, TAKEN, Claims, Launch, claim_path
from imtalker_core.errors import InputError
from tests.helpers.standin import write_small_wav2vec2
from tests.helpers.training import one_thread  # noqa: F401 (autouse fixture: one torch thread)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A models folder: `renderer.safetensors` (128²) and `generator.safetensors` (2 blocks of width 32), random
    and seeded, each recording its configuration, beside a one-layer wav2vec2 with the real output width."""
    from safetensors.torch import save_file

    from imtalker_core.checkpoints import config_metadata
    from imtalker_core.config import GeneratorConfig, tiny_renderer_config
    from imtalker_core.generator import MotionGenerator
    from imtalker_core.renderer import IMTRenderer

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    for model, name in ((IMTRenderer(tiny_renderer_config()), "renderer.safetensors"),
                        (MotionGenerator(GeneratorConfig(hidden_size=32, depth=2, num_heads=2)),
                         "generator.safetensors")):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / name),
                  metadata=config_metadata(model.cfg))
    write_small_wav2vec2(root / "wav2vec2-base-960h")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, media_dir):
    """`face.png` (the test portrait), `blank.png` (no face), `speech.wav` (0.2 s) and `drive.mp4` (3 frames)."""
    import cv2
    import soundfile

    from imtalker_core.media.video import read_video, write_video

    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(media_dir / "photo_512.png", folder / "face.png")
    cv2.imwrite(str(folder / "blank.png"), np.full((128, 128, 3), 128, np.uint8))
    speech, rate = soundfile.read(media_dir / "speech_16k_mono.wav", dtype="float32")
    soundfile.write(folder / "speech.wav", speech[rate // 2:rate // 2 + rate // 5], rate)
    write_video(folder / "drive.mp4", np.stack(list(read_video(media_dir / "driving_short.mp4", 3))), 25)
    return folder


def write_list(folder: Path, rows: list[list[str]], name: str = "jobs.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def read_report(path: Path) -> dict[int, dict]:
    with open(path, newline="") as handle:
        return {int(row["row"]): row for row in csv.DictReader(handle)}


def test_options_are_the_audio_and_video_commands_options():
    """Same names, defaults and choices as `audio`/`video`, so an empty cell means what the command's default means."""
    parser = cli.build_parser()
    commands = {"audio": vars(parser.parse_args(["audio", "i.png", "s.wav", "-o", "o.mp4"])),
                "video": vars(parser.parse_args(["video", "i.png", "d.mp4", "-o", "o.mp4"]))}
    for name, option in batch_jobs.OPTIONS.items():
        for kind in option.rows:
            assert commands[kind][name] == option.default, (name, kind)
        for kind in set(commands) - set(option.rows):
            assert name not in commands[kind], (name, kind)
    shared = set(commands["audio"]) & set(commands["video"])
    assert {"batch_size", "crop_scale", "feather", "no_crop", "paste_back"} <= shared
    for name in ("noise", "controls_fit", "motion_mode"):
        kind = batch_jobs.OPTIONS[name].rows[0]
        for choice in batch_jobs.OPTIONS[name].choices:
            flag = "--" + name.replace("_", "-")
            args = parser.parse_args([kind, "i.png", "x", "-o", "o.mp4", flag, choice])
            assert getattr(args, name) == choice


def test_paths_resolve_against_the_lists_folder_and_cells_become_options(tmp_path, inputs, monkeypatch):
    lists = tmp_path / "lists"
    (lists / "out").mkdir(parents=True)
    shutil.copy(inputs / "speech.wav", lists / "speech.wav")
    np.save(lists / "pose.npy", np.zeros((5, 3), np.float32))
    path = write_list(lists, [
        ["Image", "audio", "video", "output", "--Crop-Scale", "steps", "seed", "no_crop", "pose", "motion-mode"],
        [str(inputs / "face.png"), "speech.wav", "", "out/a.mp4", "1.8", "", "-1", "", "pose.npy", ""],
        ["# a job turned off", "", "", "", "", "", "", "", "", ""],
        ["", "", "", "", "", "", "", "", "", ""],
        [str(inputs / "face.png"), "", str(inputs / "drive.mp4"), "out/v.mp4", "", "", "", "yes", "", "relative"],
    ])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # spreadsheets' "CSV UTF-8" BOM
    monkeypatch.chdir(tmp_path)  # relative paths follow the list, not the working folder
    audio, video = batch_jobs.read_jobs("lists/jobs.csv")
    assert (audio.row, audio.kind, video.row, video.kind) == (2, "audio", 5, "video")
    assert audio.driver == lists.absolute() / "speech.wav" and audio.output == lists.absolute() / "out" / "a.mp4"
    assert audio.options["pose"] == lists.absolute() / "pose.npy" and audio.options["cam"] is None
    assert (audio.options["crop_scale"], audio.options["steps"], audio.options["seed"]) == (1.8, 10, -1)
    assert audio.options["no_crop"] is False and audio.crop().scale == 1.8 and audio.crop().crop
    assert video.driver == inputs / "drive.mp4" and "seed" not in video.options
    assert video.options["motion_mode"] == "relative" and video.crop().crop is False
    assert video.options["crop_scale"] == 1.6 and video.options["mute"] is False


def test_every_problem_of_the_list_is_reported_at_once_before_any_model_loads(tmp_path, inputs, monkeypatch, caplog):
    (tmp_path / "out").mkdir()
    face, speech, drive = str(inputs / "face.png"), str(inputs / "speech.wav"), str(inputs / "drive.mp4")
    path = write_list(tmp_path, [
        ["image", "audio", "video", "output", "steps", "cfg_scale", "paste_back", "motion_mode"],
        [face, speech, "", "out/ok.mp4", "", "", "", ""],                     # 2: fine
        [face, speech, drive, "out/both.mp4", "", "", "", ""],                # 3: audio and video
        [face, "", "", "out/none.mp4", "", "", "", ""],                       # 4: neither
        [face, speech, "", "out/steps.mp4", "ten", "", "maybe", ""],          # 5: not a number, not a flag
        [face, speech, "", "out/range.mp4", "1", "", "", ""],                 # 6: too few steps
        [face, "", drive, "out/audio-only.mp4", "5", "", "", "sideways"],      # 7: steps on a video row, bad choice
        [face, "missing.wav", "", "out/gone.mp4", "", "", "", ""],            # 8: missing file
        [face, speech, "", "out/ok.mp4", "", "", "", ""],                     # 9: row 2's output again
        [face, speech, "", "out/clip.avi", "", "", "", ""],                   # 10: not a video name
        [face, speech, "", "", "", "", "", ""],                               # 11: no output
    ])
    with pytest.raises(InputError) as caught:
        batch_jobs.read_jobs(path)
    message = str(caught.value)
    assert "10 problems" in message and "no job was started" in message
    expected = {
        "header": ["'cfg_scale' is not an option; did you mean 'cfg'?"],
        "row 3": ["either audio or video, not both"],
        "row 4": ["fill in audio or video"],
        "row 5": ["steps 'ten' is not a whole number", "paste_back 'maybe': use yes or no"],
        "row 6": ["steps=1: use a whole number from 2 to 100"],
        "row 7": ["steps applies to audio rows only; empty the cell", "motion_mode 'sideways': use one of absolute"],
        "row 8": ["audio 'missing.wav' not found"],
        "row 9": ["output 'ok.mp4' is also row 2's output"],
        "row 10": ["'.avi'"],
        "row 11": ["output is empty"],
    }
    lines = message.splitlines()[1:]
    assert len(lines) == 10
    for where, texts in expected.items():
        line = next((line for line in lines if line.strip().startswith(where + ":")), "")
        assert all(text in line for text in texts), (where, message)
    assert not any(line.strip().startswith("row 2:") for line in lines)

    without_image = write_list(tmp_path, [["audio", "output"], [speech, "out/x.mp4"]], "no_image.csv")
    with pytest.raises(InputError, match=r"has a problem; fix it .*\n  header: no 'image' column; add one$"):
        batch_jobs.read_jobs(without_image)

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before the list was checked")

    monkeypatch.setattr(runner, "load_models", no_models)
    assert cli.main(["batch", str(path), "--models", str(tmp_path / "no_models"), "--no-download"]) == 2
    assert "row 9: output 'ok.mp4'" in caplog.text and "row 3:" in caplog.text
    assert not list((tmp_path / "out").iterdir())


def test_claim_order_shares_then_steals_from_the_end_and_records_merge():
    assert batch_jobs.claim_order(5, 0, 2) == [0, 2, 4, 3, 1]
    assert batch_jobs.claim_order(5, 1, 2) == [1, 3, 4, 2, 0]
    assert batch_jobs.claim_order(2, 0, 1) == [0, 1]
    record = batch_jobs.JobRecord(2, "video", "i", "d", "o", "busy", 0)
    merged = batch_jobs.merge_records([[record], [record.__class__(**{**record.__dict__, "status": "done",
                                                                          "rank": 1}), record]])
    assert [(r.row, r.status, r.rank) for r in merged] == [(2, "done", 1)]


def test_launch_from_the_environment():
    assert Launch.from_environment({}) == Launch(0, 1, 0)
    assert Launch.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(InputError, match="RANK=4, WORLD_SIZE=4"):
        Launch.from_environment({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(InputError, match="no RANK"):
        Launch.from_environment({"WORLD_SIZE": "2"})
    assert batch_jobs.process_device("auto", Launch(1, 2, 1)) == ("cuda:1" if torch.cuda.is_available() else "cpu")


def finished_pid() -> int:
    """The pid of a process that has ended (reaped, so no longer running)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_claims_between_processes_and_runs(tmp_path):
    output = tmp_path / "talk.mp4"
    ours, sibling = Claims("run-a", 0), Claims("run-a", 1)
    assert ours.take(output) == (TAKEN, "")
    assert sibling.take(output) == (SIBLING, "")
    ours.mark(output, "failed")  # a failed job stays claimed: no sibling runs it again
    assert json.loads(claim_path(output).read_text())["state"] == "failed"
    assert sibling.take(output) == (SIBLING, "")

    later = Claims("run-b", 0)
    ours.mark(output, "running")
    status, owner = later.take(output)  # run-a's process (this one) still runs: left alone
    assert status == BUSY and "--resume" in owner and str(os.getpid()) in owner
    ours.mark(output, "done")
    assert later.take(output) == (TAKEN, "")  # done or failed: taken over without --resume
    assert json.loads(claim_path(output).read_text())["run"] == "run-b"
    later.release()
    assert not list(tmp_path.iterdir())

    def left_claim(**owner):
        claim_path(output).write_text(json.dumps({"run": "killed", "state": "running", **owner}))

    left_claim(machine=batch_jobs._machine(), pid=finished_pid())  # its process is gone: taken over
    fresh = Claims("run-c", 0)
    assert fresh.take(output) == (TAKEN, "")
    fresh.release()
    left_claim(machine="elsewhere", pid=1)  # another machine: only --resume takes it over
    assert Claims("run-d", 0).take(output)[0] == BUSY
    resumed, resumed_sibling = Claims("run-e", 0, resume=True), Claims("run-e", 1, resume=True)
    assert resumed.take(output) == (TAKEN, "")
    assert resumed_sibling.take(output) == (SIBLING, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4.claim", "talk.mp4.claim.retake-run-e"]
    resumed.release()
    assert not list(tmp_path.iterdir())

    claim_path(output).write_bytes(b"")  # created, never written
    assert Claims("run-f", 0).take(output)[0] == BUSY
    os.utime(claim_path(output), (1, 1))
    assert Claims("run-g", 0).take(output)[0] == TAKEN


def run_batch_command(jobs: Path, models: Path, report: Path, *extra: str) -> int:
    return cli.main(["batch", str(jobs), "--models", str(models), "--no-download", "--device", "cpu",
                     "--report", str(report), *extra])


def test_a_failing_job_is_skipped_and_finished_outputs_are_kept(tmp_path, tiny_models, inputs, caplog):
    """Row 3's portrait has no face: it fails at run time, the others finish, the exit status is 1. A second
    run skips the finished outputs (unchanged) and tries the failed job again; --overwrite redoes everything."""
    face, blank = str(inputs / "face.png"), str(inputs / "blank.png")
    jobs = write_list(tmp_path, [
        ["image", "audio", "video", "output", "steps", "batch_size"],
        [face, str(inputs / "speech.wav"), "", "out/talk.mp4", "2", ""],
        [blank, "", str(inputs / "drive.mp4"), "out/noface.mp4", "", ""],
        [face, "", str(inputs / "drive.mp4"), "out/reenact.mp4", "", "2"],
    ])
    (tmp_path / "out").mkdir()
    report = tmp_path / "report.csv"
    assert run_batch_command(jobs, tiny_models, report) == 1
    first = read_report(report)
    assert {row: r["status"] for row, r in first.items()} == {2: "done", 3: "failed", 4: "done"}
    assert "No face found in blank.png" in first[3]["error"] and "center_crop_if_no_face" in first[3]["error"]
    assert float(first[2]["seconds"]) > 0 and first[2]["error"] == ""
    assert re.search(r"row 3 failed after [\d.]+ s: No face found", caplog.text)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["reenact.mp4", "talk.mp4"]  # no claims left
    from imtalker_core.media.video import video_info
    assert video_info(tmp_path / "out" / "reenact.mp4").frame_count_estimate == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    assert run_batch_command(jobs, tiny_models, report) == 1
    assert {row: r["status"] for row, r in read_report(report).items()} == {2: "skipped", 3: "failed", 4: "skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps

    fixed = write_list(tmp_path, [  # the bad row with the centred square instead of a face crop
        ["image", "audio", "video", "output", "steps", "batch_size", "center_crop_if_no_face"],
        [face, str(inputs / "speech.wav"), "", "out/talk.mp4", "2", "", ""],
        [blank, "", str(inputs / "drive.mp4"), "out/noface.mp4", "", "", "yes"],
        [face, "", str(inputs / "drive.mp4"), "out/reenact.mp4", "", "2", ""],
    ], "fixed.csv")
    report_jsonl = tmp_path / "report.jsonl"
    assert run_batch_command(fixed, tiny_models, report_jsonl, "--overwrite") == 0
    statuses = {r["row"]: r["status"] for r in map(json.loads, report_jsonl.read_text().splitlines())}
    assert statuses == {2: "done", 3: "done", 4: "done"}
    assert all(stamps[name] != (tmp_path / "out" / name).stat().st_mtime_ns for name in stamps)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["noface.mp4", "reenact.mp4", "talk.mp4"]


def test_a_job_claimed_by_another_run_is_left_to_it_unless_resumed(tmp_path, tiny_models, inputs):
    jobs = write_list(tmp_path, [["image", "video", "output"],
                                 [str(inputs / "face.png"), str(inputs / "drive.mp4"), "a.mp4"],
                                 [str(inputs / "face.png"), str(inputs / "drive.mp4"), "b.mp4"]])
    claim_path(tmp_path / "b.mp4").write_text(json.dumps({"run": "old", "machine": "gpu-node-7", "pid": 4242,
                                                           "state": "running", "since": "yesterday"}))
    report = tmp_path / "report.csv"
    assert run_batch_command(jobs, tiny_models, report) == 0
    first = read_report(report)
    assert first[2]["status"] == "done" and first[3]["status"] == "busy"
    assert "process 4242 on gpu-node-7" in first[3]["error"] and not (tmp_path / "b.mp4").exists()
    assert claim_path(tmp_path / "b.mp4").exists()  # another run's claim is not ours to remove
    assert run_batch_command(jobs, tiny_models, report, "--resume") == 0
    assert {row: r["status"] for row, r in read_report(report).items()} == {2: "skipped", 3: "done"}
    assert sorted(p.name for p in tmp_path.iterdir() if ".mp4" in p.name) == ["a.mp4", "b.mp4"]


def test_two_processes_share_the_list_under_torchrun(tmp_path, tiny_models, inputs):
    """`torchrun --nproc_per_node 2 -m imtalker_core batch`: every job is done exactly once (one "done" log line
    per row), both processes work, one report comes back, and no claim is left."""
    face, speech, drive = str(inputs / "face.png"), str(inputs / "speech.wav"), str(inputs / "drive.mp4")
    rows = [["image", "audio", "video", "output", "steps"]]
    for i in range(4):
        rows.append([face, speech, "", f"out/talk{i}.mp4", "2"] if i % 2 else
                    [face, "", drive, f"out/reenact{i}.mp4", ""])
    jobs = write_list(tmp_path, rows)
    (tmp_path / "out").mkdir()
    report = tmp_path / "report.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "imtalker_core", "batch", str(jobs), "--models", str(tiny_models), "--no-download",
                           "--device", "cpu", "--report", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_report(report)
    assert {row: r["status"] for row, r in records.items()} == {2: "done", 3: "done", 4: "done", 5: "done"}
    lines = re.findall(r"rank (\d)/2: row (\d) done in", done.stderr)
    assert sorted(int(row) for _, row in lines) == [2, 3, 4, 5], done.stderr[-3000:]
    assert {rank for rank, _ in lines} == {"0", "1"} == {r["rank"] for r in records.values()}
    assert {(r["rank"], str(row)) for row, r in records.items()} == set(lines)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["reenact0.mp4", "reenact2.mp4", "talk1.mp4",
                                                                   "talk3.mp4"]
    assert "all 2 processes: 4 done, 0 failed" in done.stderr
