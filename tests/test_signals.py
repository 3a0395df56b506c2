"""SIGTERM/SIGHUP/Ctrl+C under the command line: exit 128 + signal number and no file left behind.

The child processes run `cli.main` with its `run` replaced by a tiny job that opens a
`VideoWriter`, so the signal handling of the real entry point is exercised without models.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imtalker_core import cli
from imtalker_core.errors import IMTalkerError

ROOT = Path(__file__).resolve().parent.parent

# argv: output path, "before" (no frame written yet) or "after" (the partial file exists),
# and "wait" (the test sends the signal) or a signal name to send to itself mid-job.
CHILD = r'''
import os, signal, sys, time
import numpy as np
from imtalker_core import cli
from imtalker_core.errors import IMTalkerError
from imtalker_core.media.video import VideoWriter

out, when, how = sys.argv[1], sys.argv[2], sys.argv[3]

def job(args):
    with VideoWriter(out, fps=25, preset="ultrafast") as writer:
        if when == "after":
            for step in range(300):  # libx264 holds the first frames back; write until the file exists
                writer.write(np.full((4, 64, 64, 3), (step * 7) % 256, np.uint8))
                if writer.partial_path.exists():
                    break
            else:
                raise SystemExit("the partial file was never created")
        print("ready", flush=True)
        if how != "wait":
            os.kill(os.getpid(), getattr(signal, how))
        time.sleep(60)
        print("not stopped", flush=True)
    return 0

cli.run = job
sys.exit(cli.main(["models", "--models", os.path.dirname(out)]))
'''


def _run_child(tmp_path: Path, when: str, how: str, send: signal.Signals | None = None) -> subprocess.CompletedProcess:
    """Start the child, wait for 'ready', optionally send ``send``, and collect the result."""
    out = tmp_path / "talk.mp4"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), when, how], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the job is in place (or the child died)
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"child not ready: {line!r}; stderr: {proc.communicate()[1]}")
        if send is not None:
            proc.send_signal(send)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + stdout, stderr)


needs_sighup = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


@posix_only
@pytest.mark.parametrize("when", ["after", "before"])
def test_sigterm_leaves_no_file(tmp_path: Path, when: str) -> None:
    result = _run_child(tmp_path, when, "wait", signal.SIGTERM)
    assert result.returncode == 143, result.stderr
    assert "not stopped" not in result.stdout
    assert result.stderr.count("stopped by SIGTERM; no partial output was left") == 1, result.stderr
    assert sorted(os.listdir(tmp_path)) == []  # neither talk.partial.mp4 nor talk.mp4


@posix_only
@needs_sighup
def test_sighup_sent_mid_job_leaves_no_file(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "after", "SIGHUP")  # the child signals itself while in Python code
    assert result.returncode == 129, result.stderr
    assert "stopped by SIGHUP; no partial output was left" in result.stderr
    assert sorted(os.listdir(tmp_path)) == []


@posix_only
def test_ctrl_c_still_exits_130(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "after", "wait", signal.SIGINT)
    assert result.returncode == 130, result.stderr
    assert "interrupted; no partial output was left" in result.stderr
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("outcome", ["done", "error", "interrupt"])
def test_previous_handlers_are_restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outcome: str) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None}
    during = {}

    def job(args: object) -> int:
        during.update({s: signal.getsignal(s) for s in before})
        if outcome == "error":
            raise IMTalkerError("bad input")
        if outcome == "interrupt":
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(cli, "run", job)
    code = cli.main(["models", "--models", str(tmp_path)])
    assert code == {"done": 0, "error": 2, "interrupt": 130}[outcome]
    assert all(during[s] is not before[s] and callable(during[s]) for s in before)  # installed while running
    assert {s: signal.getsignal(s) for s in before} == before


def test_no_handlers_outside_the_main_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def job(args: object) -> int:
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        return 0

    monkeypatch.setattr(cli, "run", job)
    thread = threading.Thread(target=lambda: seen.setdefault("code", cli.main(["models", "--models", str(tmp_path)])))
    thread.start()
    thread.join(timeout=30)
    assert seen == {"handler": before, "code": 0}
