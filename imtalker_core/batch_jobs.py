"""Many videos from one list: `python -m imtalker_core batch JOBS.csv`, on every GPU of a launch.

The list is a CSV file with a header row. Each further row is one job: `image`, then `audio` (an
audio-driven job, as the `audio` command) or `video` (a driving video, as the `video` command), then
`output`, then any per-row options (`OPTIONS`) named as the `audio`/`video` command-line options
(`crop_scale` or `crop-scale`; `seed`, `steps`, `cfg`, `batch_size`, `noise`, `pose`, `mute`, …). An empty
cell means that command's default; flags take yes/no, true/false, 1/0 or on/off. Relative paths are read
from the list's folder. Blank rows and rows whose first cell starts with `#` are ignored. Row numbers in
messages count the header as row 1, as a spreadsheet does::

    image,audio,video,output,steps,crop_scale
    alice.jpg,hello.wav,,out/alice.mp4,,
    bob.png,,drive.mp4,out/bob.mp4,,1.8

Every row is checked before anything heavy runs (columns, audio xor video, numbers and choices, input
files present, outputs distinct, writable and none of the inputs); all problems come in one `InputError`
naming the rows. What needs decoding (a face in the portrait, a readable speech file) is checked when the
job runs: such a job fails alone.

Processes. Started plainly, one process does every job. Under `torchrun --nproc_per_node N` or
`accelerate launch --num_processes N` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK` in the environment) each process
takes one device (`cuda:LOCAL_RANK` where CUDA is present, else `--device`), loads the models once (the
audio models only when a pending row needs them) and renders jobs until none is left. The processes
exchange only a few small messages (a run id, a start barrier, the results), over a gloo group even on
GPUs: gloo needs no GPU memory and no current CUDA device, and the path tested on the CPU is the one run on
GPUs.

Who does which job: dynamic claiming, so that jobs of uneven length balance. Before a job a process
creates `<output>.claim` with O_CREAT | O_EXCL (atomic on local disks and on NFS v3 and later), holding
its run id (drawn by rank 0 for the whole launch), machine, pid and the job's state (running, done,
failed). Each process first tries its round-robin share (pending job i with i mod N = rank, in order) and
then takes over the others' jobs from the end of their lists, so in an even run every process does its
own share and the processes rarely contend for the same claim. Claims stay until every process has
finished (then each removes its own): a claim removed as soon as its job ends would let another process
run a failed job again, or redo a job under `--overwrite`. Static round-robin would need no claim files,
but one long video would keep one GPU busy while the others idle.

Claims left by a run that was killed: a claim of another run is taken over when its job is done or
failed, when its process is gone (same machine and pid namespace, pid no longer running), or with
`--resume` (use it only when no other batch run works on the same outputs: it takes over every claim of
another run). A claim still empty a minute after it was created (its writer died between creating and
writing it) is taken over too. Otherwise the job is left to that run and reported `busy` (not a
failure). Only one process of a run takes over a given claim: it first creates
`<output>.claim.retake-<run id>` (O_EXCL), removed with its claims at the end.

Resuming: a job whose output exists is `skipped`, unless `--overwrite`; the video writers write
`<stem>.partial<suffix>` and rename it when complete, so an output under its final name is finished. A job
that fails (a face not found, an unreadable file, out of memory, …) is logged with its row and error and
the run goes on. At the end each process logs its counts and rank 0 logs the totals and writes the optional
report (`.csv` or `.jsonl`: row, kind, paths, status, rank, seconds, error per job). Exit status 1 when any
job failed (every process returns it, so the launcher fails too), else 0.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import glob
import io
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import model_files, render_memory, runner
from .compiled import check_compile_mode
from .controls.sequence import FIT_MODES
from .errors import IMTalkerError, InputError
from .sampling import NOISE_MODES
from .validation import check_batch_size, check_cfg, check_device, check_seed, check_steps

log = logging.getLogger(__name__)

AUDIO, VIDEO = "audio", "video"
BOTH = (AUDIO, VIDEO)


@dataclass(frozen=True)
class Option:
    """A per-row option: its cell's type ("int", "float", "flag", "choice" or "file"), its default (the
    `audio`/`video` command's), the rows it applies to and, for "choice", the accepted values."""

    kind: str
    default: Any
    rows: tuple[str, ...] = BOTH
    choices: tuple[str, ...] = ()


#: Per-row options, named as the `audio`/`video` command-line options (argparse's names).
OPTIONS: dict[str, Option] = {
    "batch_size": Option("int", 0),  # 0: what the process's device holds (render_memory.auto_batch_size)
    "no_crop": Option("flag", False),
    "crop_scale": Option("float", 1.6),
    "center_crop_if_no_face": Option("flag", False),
    "paste_back": Option("flag", False),
    "feather": Option("float", 0.1),
    "seed": Option("int", 42, (AUDIO,)),
    "steps": Option("int", 10, (AUDIO,)),
    "cfg": Option("float", 3.0, (AUDIO,)),
    "pose": Option("file", None, (AUDIO,)),
    "cam": Option("file", None, (AUDIO,)),
    "gaze": Option("file", None, (AUDIO,)),
    "controls_fit": Option("choice", "hold", (AUDIO,), FIT_MODES),
    "noise": Option("choice", "reference", (AUDIO,), tuple(NOISE_MODES)),
    "noise_on_device": Option("flag", False, (AUDIO,)),
    "mute": Option("flag", False, (VIDEO,)),
    "motion_mode": Option("choice", "absolute", (VIDEO,), runner.MOTION_MODES),
    "crop_driving": Option("flag", False, (VIDEO,)),
}
PATH_COLUMNS = ("image", AUDIO, VIDEO, "output")
#: Names people reach for, and the column meant.
_COLUMN_HINTS = {"cfg_scale": "cfg", "driving": VIDEO, "speech": AUDIO, "portrait": "image", "source": "image",
                 "o": "output", "out": "output", "scale": "crop_scale"}
_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")
_CONTROL_WIDTHS = {"pose": 3, "cam": 3, "gaze": 2}
NO_FACE_HINT = "set center_crop_if_no_face to yes in its row to use the centred square, or crop the photo yourself"


@dataclass(frozen=True)
class Job:
    """One row of the list. `driver` is the speech (kind "audio") or the driving video (kind "video"); paths
    are absolute; `options` holds every option of `OPTIONS` that applies to the kind (defaults filled in)."""

    row: int
    kind: str
    image: Path
    driver: Path
    output: Path
    options: Mapping[str, Any]

    def crop(self) -> runner.CropSettings:
        return _crop_settings(self.options)


def _crop_settings(options: Mapping[str, Any]) -> runner.CropSettings:
    return runner.CropSettings(crop=not options["no_crop"], scale=options["crop_scale"],
                               on_no_face="center" if options["center_crop_if_no_face"] else "error",
                               paste_back=options["paste_back"], feather=options["feather"],
                               crop_driving=options.get("crop_driving", False), no_face_hint=NO_FACE_HINT)


# --------------------------------------------------------------------------- reading and checking the list


def column_name(header_cell: str) -> str:
    """A header cell as an option name: case and surrounding blanks ignored, dashes as underscores, leading
    dashes dropped (`--crop-scale` → `crop_scale`)."""
    return header_cell.strip().lower().lstrip("-").replace("-", "_")


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Read and check a job list (see the module docstring). Raises one `InputError` listing every problem
    of the header and of every row, each with its row number and what to change."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets' "CSV UTF-8" starts with a BOM
    except FileNotFoundError as err:
        raise InputError(f"job list '{path}' not found") from err
    except UnicodeDecodeError as err:
        raise InputError(f"job list '{path}' is not UTF-8 text; save it as CSV (UTF-8)") from err
    except OSError as err:
        raise InputError(f"job list '{path}' cannot be read: {err}") from err
    folder = Path(os.path.abspath(path.parent))
    reader = csv.reader(io.StringIO(text))
    try:
        rows = [(reader.line_num, cells) for cells in reader]
    except csv.Error as err:  # e.g. a NUL byte: not a text file
        raise InputError(f"job list '{path}' is not a CSV file (row {reader.line_num}: {err})") from err
    if not rows or not any(cell.strip() for cell in rows[0][1]):
        raise InputError(f"job list '{path}' is empty; its first row names the columns: "
                         "image, audio or video, output, and any options")
    header = rows[0][1]
    columns, problems = _read_header(header)
    jobs: list[Job] = []
    for row, cells in rows[1:]:
        if not any(cell.strip() for cell in cells) or cells[0].lstrip().startswith("#"):
            continue
        if any(cell.strip() for cell in cells[len(header):]):
            problems.append(f"row {row}: {len(cells)} cells but the header names {len(header)} columns; "
                            "quote cells that contain commas")
            continue
        values = {name: cells[i].strip() for i, name in columns.items() if i < len(cells)}
        job, row_problems = _read_row(values, row, folder, set(columns.values()))
        if row_problems:
            problems.append(f"row {row}: " + "; ".join(row_problems))
        elif job is not None:
            jobs.append(job)
    problems += _across_rows(jobs)
    if problems:
        count = f"{len(problems)} problems; fix them" if len(problems) > 1 else "a problem; fix it"
        raise InputError(f"job list '{path.name}' has {count} and run again (no job was started):\n  "
                         + "\n  ".join(problems))
    if not jobs:
        raise InputError(f"job list '{path.name}' has no jobs: add a row per video under the header")
    return jobs


def _read_header(header: list[str]) -> tuple[dict[int, str], list[str]]:
    """`{cell index: column name}` for the known columns, and the header's problems."""
    known = (*PATH_COLUMNS, *OPTIONS)
    columns: dict[int, str] = {}
    problems = []
    for index, cell in enumerate(header):
        name = column_name(cell)
        if not name:
            problems.append(f"header: column {index + 1} has no name; name it or delete the column")
        elif name not in known:
            guess = _COLUMN_HINTS.get(name) or next(iter(difflib.get_close_matches(name, known, 1)), None)
            hint = f"did you mean '{guess}'? " if guess else ""
            if ";" in cell:
                hint = "separate the columns with commas, not semicolons; "
            problems.append(f"header: column '{cell.strip()}' is not an option; {hint}columns: {', '.join(known)}")
        elif name in columns.values():
            problems.append(f"header: column '{name}' appears twice; keep one")
        else:
            columns[index] = name
    named = set(columns.values())
    for required in ("image", "output"):
        if required not in named:
            problems.append(f"header: no '{required}' column; add one")
    if not named & {AUDIO, VIDEO}:
        problems.append("header: no 'audio' or 'video' column; add one (or both) to say what drives each video")
    return columns, problems


def _resolve(cell: str, folder: Path) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else folder / path


def _read_row(values: Mapping[str, str], row: int, folder: Path,
              named: set[str]) -> tuple[Job | None, list[str]]:
    """The job of one row, or None with the row's problems (each a short sentence without the row number)."""
    problems = []
    kinds = [k for k in BOTH if values.get(k)]
    if len(kinds) == 2:
        problems.append("give either audio or video, not both")
    elif not kinds and named & set(BOTH):
        problems.append(f"fill in {' or '.join(k for k in BOTH if k in named)}")
    kind = kinds[0] if len(kinds) == 1 else None
    paths: dict[str, Path] = {}
    for name in ("image", *kinds, "output"):
        if name not in named:
            continue
        if not values.get(name):
            problems.append(f"{name} is empty")
            continue
        paths[name] = _resolve(values[name], folder)
        if name != "output" and not paths[name].is_file():
            problems.append(f"{name} '{values[name]}' not found (looked for {paths[name]})")
    options: dict[str, Any] = {}
    for name, option in OPTIONS.items():
        cell = values.get(name, "")
        if kind is not None and kind not in option.rows:
            if cell:
                problems.append(f"{name} applies to {option.rows[0]} rows only; empty the cell")
            continue
        try:
            options[name] = _option_value(name, option, cell, folder)
        except InputError as err:
            problems.append(str(err))
    if kind is not None and not problems:
        problems += _check_settings(kind, options)
    if problems or kind is None or not {"image", "output"} <= paths.keys():
        return None, problems
    job = Job(row, kind, paths["image"], paths[kind], paths["output"], options)
    try:
        runner.check_output_path(job.output, inputs=_inputs(job))
    except InputError as err:
        return None, [str(err)]
    return job, []


def _option_value(name: str, option: Option, cell: str, folder: Path) -> Any:
    """A cell as its option's value (`option.default` when empty); `InputError` naming the option."""
    if not cell:
        return option.default
    if option.kind == "int":
        try:
            return int(cell)
        except ValueError:
            raise InputError(f"{name} {cell!r} is not a whole number") from None
    if option.kind == "float":
        try:
            return float(cell)
        except ValueError:
            raise InputError(f"{name} {cell!r} is not a number") from None
    if option.kind == "flag":
        if cell.lower() in _TRUE:
            return True
        if cell.lower() in _FALSE:
            return False
        raise InputError(f"{name} {cell!r}: use yes or no (or leave it empty for no)")
    if option.kind == "choice":
        if cell not in option.choices:
            raise InputError(f"{name} {cell!r}: use one of {', '.join(option.choices)}")
        return cell
    assert option.kind == "file", option.kind
    path = _resolve(cell, folder)
    if not path.is_file():
        raise InputError(f"{name} file '{cell}' not found (looked for {path})")
    return path


def _check_settings(kind: str, options: Mapping[str, Any]) -> list[str]:
    """The numbers' ranges and the crop settings, as the commands check them."""
    checks = [lambda: options["batch_size"] == 0 or check_batch_size(options["batch_size"], "batch_size"),
              lambda: runner.check_crop(_crop_settings(options))]
    if kind == AUDIO:
        checks += [lambda: check_seed(options["seed"]), lambda: check_steps(options["steps"]),
                   lambda: check_cfg(options["cfg"])]
    problems = []
    for check in checks:
        try:
            check()
        except InputError as err:
            problems.append(str(err))
    return problems


def _inputs(job: Job) -> list[Path]:
    return [job.image, job.driver, *(job.options.get(name) for name in _CONTROL_WIDTHS if job.options.get(name))]


def _same_path_key(path: Path) -> str:
    return os.path.normcase(str(path.resolve()))


def _across_rows(jobs: Sequence[Job]) -> list[str]:
    """Outputs named twice, and outputs that are another row's input."""
    problems = []
    first_row: dict[str, int] = {}
    for job in jobs:
        key = _same_path_key(job.output)
        if key in first_row:
            problems.append(f"row {job.row}: output '{job.output.name}' is also row {first_row[key]}'s output; "
                            "give each row its own output")
        else:
            first_row[key] = job.row
    for job in jobs:
        for item in _inputs(job):
            writer = first_row.get(_same_path_key(item))
            if writer is not None and writer != job.row:
                problems.append(f"row {writer}: its output '{item.name}' is an input of row {job.row}; "
                                "choose another output name")
    return problems


# --------------------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch: `RANK` (0 … world_size − 1), `WORLD_SIZE` and `LOCAL_RANK` (its
    index on its machine), as torchrun and `accelerate launch` set them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Launch":
        """The launch described by `environ`; one process alone when `WORLD_SIZE` is absent."""
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            world = int(environ["WORLD_SIZE"])
            rank = int(environ.get("RANK", "0"))
            local = int(environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK are not whole numbers ({err}); start the processes "
                             "with torchrun or accelerate launch") from err
        if world < 1 or not 0 <= rank < world or local < 0:
            raise InputError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a launch; "
                             "start the processes with torchrun or accelerate launch")
        if world > 1 and "RANK" not in environ:
            raise InputError(f"WORLD_SIZE={world} but no RANK; start the processes with torchrun or accelerate launch")
        return cls(rank, world, local)


def process_device(requested: str, launch: Launch) -> str:
    """This process's device: `cuda:LOCAL_RANK` for "auto" or "cuda" where CUDA is present, else "mps" or
    "cpu" for "auto", else `requested` itself (checked)."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise InputError(f"process {launch.local_rank} of this machine has no GPU of its own ({count} visible); "
                             f"start at most {count} processes per machine")
        return f"cuda:{launch.local_rank}"
    if requested == "auto":
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    device = str(check_device(requested))
    if launch.world_size > 1 and device.startswith("cuda:"):
        log.warning("--device %s: every process of the launch renders on this one GPU", device)
    return device


#: How long a process waits for the others at a barrier: the slowest model load, or the longest last job.
GROUP_TIMEOUT = timedelta(hours=24)


class _Group:
    """The few messages between the processes of a launch, over gloo; a no-op for one process alone."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.created = False

    def __enter__(self) -> "_Group":
        import torch.distributed as dist

        if self.launch.world_size == 1 or dist.is_initialized():
            return self
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise InputError(f"WORLD_SIZE={self.launch.world_size} but {' and '.join(missing)} unset; start the "
                             "processes with torchrun or accelerate launch")
        dist.init_process_group("gloo", rank=self.launch.rank, world_size=self.launch.world_size,
                                timeout=GROUP_TIMEOUT)
        self.created = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every process."""
        if self.launch.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.launch.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list:
        """Every process's `value`, by rank, on every process."""
        if self.launch.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.launch.world_size
        dist.all_gather_object(values, value)
        return values


# --------------------------------------------------------------------------- claims

CLAIM_SUFFIX = ".claim"
#: Seconds after which a claim without readable content is taken as left by a process that died writing it.
UNREADABLE_CLAIM_S = 60.0
#: What `Claims.take` found.
TAKEN, SIBLING, BUSY = "taken", "sibling", "busy"


def claim_path(output: Path) -> Path:
    return output.with_name(output.name + CLAIM_SUFFIX)


def _machine() -> str:
    """This machine and pid namespace: pids are comparable only between processes with the same value."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


def _pid_running(pid: Any) -> bool:
    """Whether `pid` runs on this machine; True when that cannot be told."""
    if not isinstance(pid, int) or pid <= 0 or os.name == "nt":  # Windows' os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: running, as another user
        return True
    return True


class Claims:
    """This process's claim files (see the module docstring): `take` before a job, `mark` its state after,
    `release` all at the end of the run."""

    def __init__(self, run_id: str, rank: int, resume: bool = False):
        self.run_id, self.rank, self.resume = run_id, rank, resume
        self.machine, self.pid = _machine(), os.getpid()
        self.held: list[Path] = []  # claims and take-over markers this process created

    def _content(self, state: str) -> bytes:
        return json.dumps({"run": self.run_id, "rank": self.rank, "machine": self.machine, "pid": self.pid,
                           "state": state, "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()

    def _create(self, path: Path) -> bool:
        """Create `path` holding a running claim, unless it exists (atomic across processes and machines)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content("running"))
        finally:
            os.close(fd)
        self.held.append(path)
        return True

    @staticmethod
    def _read(path: Path) -> tuple[dict | None, float] | None:
        """(the claim's content or None when unreadable, its age in seconds), or None when it is gone."""
        try:
            age = time.time() - path.stat().st_mtime
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            log.debug("claim %s unreadable: %s", path, err)
            return None, 0.0  # young: left alone, as a claim being written
        try:
            content = json.loads(text)
        except ValueError:
            return None, age
        return (content if isinstance(content, dict) else None), age

    def _stale(self, owner: dict | None, age: float) -> bool:
        """Whether a claim of `owner` (None: unreadable), `age` seconds old, may be taken over."""
        if owner is None:
            return age > UNREADABLE_CLAIM_S
        if owner.get("run") == self.run_id:
            return False
        if owner.get("state") in ("done", "failed") or self.resume:
            return True
        return owner.get("machine") == self.machine and not _pid_running(owner.get("pid"))

    def take(self, output: Path) -> tuple[str, str]:
        """Claim the job writing `output`: (TAKEN, ""), (SIBLING, "") when a process of this run has it, or
        (BUSY, who) when another run holds it."""
        path = claim_path(output)
        for _ in range(3):  # a claim that disappears between two looks is tried again
            if self._create(path):
                return TAKEN, ""
            found = self._read(path)
            if found is None:
                continue
            owner, age = found
            if owner is not None and owner.get("run") == self.run_id:
                return SIBLING, ""
            if not self._stale(owner, age):
                return BUSY, _describe(owner)
            return self._take_over(path)
        return BUSY, "claims kept changing"

    def _take_over(self, path: Path) -> tuple[str, str]:
        """Replace a stale claim; the O_EXCL marker lets only one process of this run do it."""
        marker = path.with_name(f"{path.name}.retake-{self.run_id}")
        if not self._create(marker):
            return SIBLING, ""
        found = self._read(path)  # judged again: it may have changed while the marker was made
        if found is not None:
            owner, age = found
            if owner is not None and owner.get("run") == self.run_id:
                return SIBLING, ""
            if not self._stale(owner, age):
                return BUSY, _describe(owner)
            log.info("taking over %s (%s)", path.name, _describe(owner))
            path.unlink(missing_ok=True)
        if self._create(path):
            return TAKEN, ""
        return BUSY, "claimed again by another run meanwhile"

    def mark(self, output: Path, state: str) -> None:
        """Record the job's state ("done" or "failed") in its claim, replacing the content atomically."""
        path = claim_path(output)
        scratch = path.with_name(f"{path.name}.{self.run_id[:8]}-{self.rank}.tmp")
        try:
            scratch.write_bytes(self._content(state))
            os.replace(scratch, path)
        except OSError as err:
            log.warning("could not record %s in %s: %s", state, path, err)

    def release(self) -> None:
        """Remove every claim and marker this process created, and markers of killed runs beside them."""
        for path in reversed(self.held):
            if path.name.endswith(CLAIM_SUFFIX):
                for marker in path.parent.glob(f"{glob.escape(path.name)}.retake-*"):
                    _remove(marker)
            _remove(path)
        self.held.clear()


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not remove %s: %s", path, err)


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "a claim being written"
    return (f"claimed by process {owner.get('pid')} on {str(owner.get('machine', '?')).split()[0]} "
            f"since {owner.get('since', '?')}; if no other batch run is working on this list, add --resume")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class JobRecord:
    """What became of one job: status "done", "failed", "skipped" (its output existed) or "busy" (another run
    holds it); `rank` the process that reports it; `seconds` of work; `error` the message ("" if none)."""

    row: int
    kind: str
    image: str
    driver: str
    output: str
    status: str
    rank: int
    seconds: float = 0.0
    error: str = ""


STATUSES = ("done", "failed", "skipped", "busy")
#: Which record of a job wins when processes report it differently (e.g. one saw it busy, another did it).
_PRECEDENCE = {"done": 3, "failed": 2, "skipped": 1, "busy": 0}
REPORT_SUFFIXES = (".csv", ".jsonl")


def _record(job: Job, status: str, rank: int, seconds: float = 0.0, error: str = "") -> JobRecord:
    return JobRecord(job.row, job.kind, str(job.image), str(job.driver), str(job.output), status, rank,
                     round(seconds, 3), error)


def claim_order(count: int, rank: int, world_size: int) -> list[int]:
    """Indices of `count` pending jobs in the order process `rank` tries them: its own share (i mod
    world_size = rank) first, then the others' from the end, where their owners get to last."""
    own = [i for i in range(count) if i % world_size == rank]
    others = [i for i in reversed(range(count)) if i % world_size != rank]
    return own + others


def merge_records(per_process: Sequence[Sequence[JobRecord]]) -> list[JobRecord]:
    """One record per job (the most decisive, `_PRECEDENCE`), by row."""
    best: dict[int, JobRecord] = {}
    for records in per_process:
        for record in records:
            kept = best.get(record.row)
            if kept is None or _PRECEDENCE[record.status] > _PRECEDENCE[kept.status]:
                best[record.row] = record
    return [best[row] for row in sorted(best)]


def _counts(records: Sequence[JobRecord]) -> str:
    counts = Counter(r.status for r in records)
    return (f"{counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped (output existed), "
            f"{counts['busy']} busy (another run)")


def check_report_path(report: str | os.PathLike | None) -> Path | None:
    """The report file name: `.csv` or `.jsonl`, in an existing folder."""
    if report is None:
        return None
    path = Path(report)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"report '{path}': name it .csv or .jsonl")
    if not path.parent.is_dir():
        raise InputError(f"report '{path}': the folder '{path.parent}' does not exist; create it first")
    return path


def write_report(path: Path, records: Sequence[JobRecord]) -> None:
    """Write `records` as CSV (a header of `JobRecord`'s fields) or JSON lines, by `path`'s suffix; the file
    appears complete or not at all."""
    scratch = path.with_name(path.name + ".partial")
    rows = [dataclasses.asdict(r) for r in records]
    with open(scratch, "w", newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(JobRecord)])
            writer.writeheader()
            writer.writerows(rows)
    os.replace(scratch, path)


def run_job(models: runner.Models, job: Job, device: str) -> Path:
    """Render one job with loaded `models` (the audio models for audio rows); returns the output path."""
    o = dict(job.options)
    if o["batch_size"] == 0:
        o["batch_size"] = render_memory.auto_batch_size(device, next(models.renderer.parameters()).dtype)
    if job.kind == AUDIO:
        controls = {name: runner.load_controls(o[name], width, name) for name, width in _CONTROL_WIDTHS.items()}
        return runner.audio_to_video(models, job.image, job.driver, job.output, job.crop(), seed=o["seed"],
                                     steps=o["steps"], cfg_scale=o["cfg"], **controls, batch_size=o["batch_size"],
                                     noise=o["noise"], noise_device=device if o["noise_on_device"] else "cpu",
                                     controls_fit=o["controls_fit"])
    return runner.video_to_video(models, job.image, job.driver, job.output, job.crop(), batch_size=o["batch_size"],
                                 keep_audio=not o["mute"], motion_mode=o["motion_mode"])


def run_batch(jobs_csv: str | os.PathLike, *, models_dir: str | os.PathLike | None = None, device: str = "auto",
              dtype: torch.dtype | None = None, download: bool = True, overwrite: bool = False,
              resume: bool = False, report: str | os.PathLike | None = None,
              launch: Launch | None = None, compile_mode: str = "off", allow_tf32: bool = False) -> int:
    """Run every job of `jobs_csv` in this process and its launch siblings (see the module docstring).

    dtype None: float16 on CUDA, float32 elsewhere. `launch` None: from the environment. `compile_mode` and
    `allow_tf32`: see `runner.load_models` (compiled once per process, reused by every job). Returns the exit
    status: 1 when any job of the run failed, else 0. The list and the settings are checked before any model
    loads (`InputError`)."""
    jobs = read_jobs(jobs_csv)
    report_path = check_report_path(report)
    compile_mode = check_compile_mode(compile_mode)
    launch = launch or Launch.from_environment()
    device = process_device(device, launch)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    tag = f"rank {launch.rank}/{launch.world_size}: " if launch.world_size > 1 else ""
    started = time.perf_counter()
    with _Group(launch) as group:
        claims = Claims(group.broadcast(uuid.uuid4().hex), launch.rank, resume)
        try:
            # Nobody renders before the barrier below, so every process sees the same finished outputs.
            finished = [not overwrite and job.output.exists() for job in jobs]
            pending = [job for job, done in zip(jobs, finished) if not done]
            records = [_record(job, "skipped", launch.rank) for i, (job, done) in enumerate(zip(jobs, finished))
                       if done and i % launch.world_size == launch.rank]
            models = _load_models(pending, models_dir, device, dtype, download, launch, group, compile_mode,
                                  allow_tf32)
            log.info("%s%d jobs, %d with an output already; rendering on %s", tag, len(jobs),
                     len(jobs) - len(pending), device)
            for index in claim_order(len(pending), launch.rank, launch.world_size):
                record = _attempt(pending[index], index % launch.world_size == launch.rank, models, device, claims,
                                  overwrite, launch.rank, tag)
                if record is not None:
                    records.append(record)
            log.info("%sthis process: %s in %.1f s", tag, _counts(records), time.perf_counter() - started)
            merged = merge_records(group.gather(records))
        finally:
            claims.release()
    if launch.rank == 0:
        if launch.world_size > 1:
            log.info("all %d processes: %s", launch.world_size, _counts(merged))
        for record in merged:
            if record.status == "failed":
                log.error("row %d failed: %s", record.row, record.error)
        if report_path is not None:
            write_report(report_path, merged)
            log.info("report: %s", report_path)
    return 1 if any(r.status == "failed" for r in merged) else 0


def _load_models(pending: Sequence[Job], models_dir, device: str, dtype: torch.dtype, download: bool,
                 launch: Launch, group: _Group, compile_mode: str, allow_tf32: bool) -> runner.Models | None:
    """The models the pending jobs need, loaded once; the first process of each machine downloads missing files
    while the others wait. Every process passes the same barriers, whatever it loads."""
    if pending and (launch.local_rank == 0 or not download):
        model_files.ensure_models(models_dir, download=download)
    group.barrier()
    models = None
    if pending:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if device == "cpu" and dtype != torch.float32:
            log.warning("%s on the CPU is usually much slower than float32 and less exact", dtype)
        models = runner.load_models(models_dir, device, dtype, audio=any(j.kind == AUDIO for j in pending),
                                    download=False, compile_mode=compile_mode, allow_tf32=allow_tf32)
    group.barrier()
    return models


def _attempt(job: Job, own_share: bool, models: runner.Models, device: str, claims: Claims, overwrite: bool,
             rank: int, tag: str) -> JobRecord | None:
    """Claim and run one job; its record, or None when a process of this run has it (that one reports it)
    or another run has it and the job is another process's share (that one reports it busy)."""
    try:
        status, owner = claims.take(job.output)
    except OSError as err:  # e.g. the output folder became read-only: this job cannot be claimed, others may
        log.error("%srow %d: cannot claim %s: %s", tag, job.row, claim_path(job.output), err)
        return _record(job, "failed", rank, error=f"cannot claim {claim_path(job.output).name}: {err}")
    if status == SIBLING:
        return None
    if status == BUSY:
        if not own_share:
            return None
        log.warning("%srow %d (%s) left to another run: %s", tag, job.row, job.output.name, owner)
        return _record(job, "busy", rank, error=owner)
    if not overwrite and job.output.exists():  # finished by another run since the start
        claims.mark(job.output, "done")
        return _record(job, "skipped", rank)
    start = time.perf_counter()
    try:
        run_job(models, job, device)
    except Exception as err:  # noqa: BLE001 - one bad job must not stop the list; Ctrl+C and exits still do
        seconds = time.perf_counter() - start
        claims.mark(job.output, "failed")
        # The project's own errors say what to fix; anything else may be a bug, so its traceback is kept.
        log.error("%srow %d failed after %.1f s: %s", tag, job.row, seconds, err,
                  exc_info=not isinstance(err, IMTalkerError))
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return _record(job, "failed", rank, seconds, f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - start
    claims.mark(job.output, "done")
    log.info("%srow %d done in %.1f s: %s", tag, job.row, seconds, job.output)
    return _record(job, "done", rank, seconds)

