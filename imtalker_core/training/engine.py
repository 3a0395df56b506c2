"""Training engine: a thin layer over Hugging Face Accelerate shared by the generator and renderer trainers.

Accelerate (`pip install accelerate`, needed for training only) runs the same script on one device or, under
`accelerate launch`, as one process per GPU (DDP). A trainer uses the engine like this::

    accelerator = make_accelerator("bf16", cpu=False, seed=0)
    model, optimizer = accelerator.prepare(model, optimizer)      # the module whose forward computes the loss
    part = Part("generator", model, optimizer, cosine_schedule(optimizer, steps, 0, 1e-5), EMA(model, 0.9999))
    start = resume(run_dir / "checkpoints", accelerator, [part]) if resuming else 0

    def step_fn(batch, step):                                     # runs under accelerator.autocast()
        losses = model(batch)                                     # {"loss": ..., other terms}
        optimize(accelerator, part, losses["loss"])               # backward, clip, step, schedule, EMA
        return losses                                             # logged (averaged over log_every steps)

    train_loop(accelerator, [part], step_fn, step_batches(dataset, 16, 0, accelerator), steps, start_step=start,
               checkpoint_dir=run_dir / "checkpoints", log_file=run_dir / "log.jsonl")
    export_safetensors(accelerator.unwrap_model(model).generator, run_dir / "generator_ema.safetensors",
                       {"imtalker_kind": "generator"}, ema=part.ema)

A GAN has two parts (generator, discriminator) and calls `optimize` once per part per step.

Determinism and resuming: the batches of step k are a pure function of (seed, k, process) (`StepSampler`),
and a checkpoint holds everything the next step depends on (weights, EMA, optimizer, schedule, fp16 loss
scale, and every process's Python/NumPy/torch/CUDA random states), so resuming from step k computes the
same step k + 1 as the uninterrupted run (same losses and weights up to nondeterministic GPU kernels).

Checkpoint folder layout (`<checkpoint_dir>/step-00001000/`), written to a `.partial` folder and renamed
when complete::

    part-<name>.safetensors        the part's model state dict (unwrapped)
    part-<name>.ema.safetensors    its EMA weights (trainable parameters only), when it has an EMA
    part-<name>.optim.pt           {"optimizer": state dict, "scheduler": state dict}
    scaler.pt                      the fp16 GradScaler state (mixed_precision="fp16" only)
    rng-<process>.pt               each process's random states
    state.json                     {"step": k, "processes": n, "parts": [...], "extra": {...}}

`.pt` files are written with `torch.save` and read with `torch.load(weights_only=True)`. Accelerate's own
`save_state`/`load_state` is not used: it unpickles objects registered for checkpointing with
`weights_only=False`, and it carries on silently when random states cannot be restored.

Multi-GPU: DDP only (no FSDP/DeepSpeed sharding), one machine or several sharing the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..checkpoints import config_metadata
from ..errors import IMTalkerError, InputError

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "step-"
_STATE_FILE = "state.json"


def _accelerate():
    try:
        import accelerate
    except ImportError as err:  # training is optional; inference never imports this module
        raise InputError("training needs Hugging Face Accelerate: pip install accelerate") from err
    return accelerate


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / compile wrappers (the module itself when it is not wrapped)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def make_accelerator(mixed_precision: str = "no", cpu: bool = False, seed: int = 0,
                     gradient_accumulation_steps: int = 1):
    """An `accelerate.Accelerator` with every process's random generators seeded.

    mixed_precision: "no" (float32), "fp16" (autocast + dynamic loss scaling) or "bf16" (autocast).
    cpu: run on the CPU even when a GPU is present. Process i is seeded with `seed + i`, so the
    processes of a multi-GPU run draw different noise (their batches differ by `StepSampler`).
    The scheduler is stepped by `optimize` once per optimizer step, never by Accelerate.
    """
    accelerate = _accelerate()
    if mixed_precision not in MIXED_PRECISION:
        raise InputError(f"mixed_precision={mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
    if gradient_accumulation_steps < 1:
        raise InputError(f"gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}")
    accelerator = accelerate.Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                                         gradient_accumulation_steps=gradient_accumulation_steps,
                                         step_scheduler_with_optimizer=False)
    accelerate.utils.set_seed(seed + accelerator.process_index)
    log.info("accelerator: %d process(es), device %s, mixed precision %s", accelerator.num_processes,
             accelerator.device, mixed_precision)
    return accelerator


class _CosineFactor:
    """LR multiplier: linear warm-up from 0, then a half cosine from 1 down to `final_factor`.

    A callable object rather than a closure, so that `LambdaLR.state_dict()` records its settings.
    """

    def __init__(self, total_steps: int, warmup: int, final_factor: float):
        self.total_steps, self.warmup, self.final_factor = total_steps, warmup, final_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 0,
                    final_lr: float = 1e-5) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR schedule: linear warm-up over `warmup` steps, then cosine decay from each param
    group's `lr` to `final_lr` (absolute) at `total_steps` (the reference's `CosineAnnealingLR(T_max=iter,
    eta_min=1e-5)` with warm-up added). A `final_lr` above a group's `lr` is an error."""
    if total_steps < 1 or warmup < 0:
        raise InputError(f"the schedule needs total_steps >= 1 and warmup >= 0, got {total_steps}, {warmup}")
    factors = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        if final_lr > base:
            raise InputError(f"final_lr {final_lr} is above the learning rate {base}; lower it or raise --lr")
        factors.append(_CosineFactor(total_steps, warmup, final_lr / base if base > 0 else 0.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class EMA:
    """Exponential moving average of a model's trainable parameters: `shadow ← d·shadow + (1−d)·param`
    after every optimizer step (decay d; the reference: 0.9999, no warm-up, kept as `ema_state_dict`).

    `model` may be wrapped (DDP); the average is kept on the parameters' device in their dtype.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise InputError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the current parameters."""
        for i, (avg, param) in enumerate(zip(self.shadow, self._params)):
            if avg.device != param.device:
                self.shadow[i] = avg = avg.to(param.device)
            avg.lerp_(param.detach().to(avg.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{parameter name: averaged tensor}` (names of the unwrapped model, as `ema_state_dict`)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load averages saved by `state_dict`; the parameter names must match exactly."""
        missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
        if missing or unexpected:
            raise IMTalkerError(f"EMA state does not match the model: {len(missing)} missing "
                                f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected "
                                f"(e.g. {sorted(unexpected)[:2]})")
        for name, avg in zip(self.names, self.shadow):
            avg.copy_(state[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s trainable parameters (same architecture, e.g. a fresh copy) with the averages."""
        params = dict(unwrap(model).named_parameters())
        for name, avg in zip(self.names, self.shadow):
            params[name].copy_(avg)

    def merged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s full state dict (buffers included) with the averages in place of its trainable
        parameters: what a loader of the EMA weights expects."""
        state = dict(unwrap(model).state_dict())
        state.update(self.state_dict())
        return state


@dataclass
class Part:
    """One trained network: its (prepared) model, optimizer, LR schedule, optional EMA and gradient clip.

    `name` names its checkpoint files (`part-<name>.*`); `clip_grad_norm` is the max L2 norm of all its
    gradients (None or 0: no clipping).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    ema: EMA | None = None
    clip_grad_norm: float | None = 1.0


def optimize(accelerator, part: Part, loss: torch.Tensor) -> torch.Tensor | None:
    """One optimizer step of `part` on `loss` (a scalar): backward (loss-scaled under fp16), gradient
    clipping, step, LR schedule, EMA update, zeroed gradients.

    Under gradient accumulation only the last micro-batch of a step clips, steps, schedules and updates
    the EMA. A step that fp16 loss scaling skipped (inf/NaN gradients) moves neither schedule nor EMA.
    Returns the gradient norm before clipping (a tensor) when it was computed, else None.
    """
    accelerator.backward(loss)
    norm = None
    if accelerator.sync_gradients and part.clip_grad_norm:
        norm = accelerator.clip_grad_norm_(part.model.parameters(), part.clip_grad_norm)
    part.optimizer.step()
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        if part.scheduler is not None:
            part.scheduler.step()
        if part.ema is not None:
            part.ema.update()
    part.optimizer.zero_grad(set_to_none=True)
    return norm


# --- data ----------------------------------------------------------------------------------------------------


class SampleKey(NamedTuple):
    """What a training dataset's `__getitem__` receives from `StepSampler`: which item, and a seed for the
    item's own random choices (window start, reference frame, ...), so an item is a pure function of its key."""

    index: int
    seed: int


class StepSampler(torch.utils.data.Sampler):
    """An endless batch sampler whose batch for step k is a pure function of (seed, k, rank).

    Sample position p = (k · world + rank) · batch_size + j runs through epochs of `num_items`; each epoch
    visits every item once in a seeded permutation (as a shuffled loader does), and the item's seed is
    derived from (seed, p). So the batches do not depend on where a run was started or resumed, and the
    processes of a multi-GPU run read disjoint samples. `start_step` is the first step yielded.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_step: int = 0, rank: int = 0,
                 world: int = 1):
        if num_items < 1:
            raise InputError("the training set is empty; prepare some clips first")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self._epoch, self._order = -1, np.arange(0)

    def _item(self, position: int) -> SampleKey:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        item_seed = int(np.random.SeedSequence([self.seed, position]).generate_state(1, np.uint64)[0] >> 1)
        return SampleKey(int(self._order[offset]), item_seed)

    def batch_keys(self, step: int) -> list[SampleKey]:
        first = (step * self.world + self.rank) * self.batch_size
        return [self._item(first + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start_step
        while True:
            yield self.batch_keys(step)
            step += 1


def step_batches(dataset: torch.utils.data.Dataset, batch_size: int, seed: int, accelerator,
                 num_workers: int = 0, collate_fn: Callable | None = None) -> Callable[[int], Iterator[Any]]:
    """`batches(first_step)` for `train_loop`: an endless iterator of this process's batches from
    `first_step` on (`StepSampler` keys through a DataLoader), moved to the accelerator's device.

    `dataset[SampleKey]` must return a dict of tensors (or what `collate_fn` accepts). `first_step` counts
    micro-batches (`train_loop` asks for step × gradient_accumulation_steps).
    """
    from accelerate.utils import send_to_device

    def batches(first_step: int) -> Iterator[Any]:
        sampler = StepSampler(len(dataset), batch_size, seed, first_step, accelerator.process_index,
                              accelerator.num_processes)
        # A private generator: creating the loader must not consume the global random stream, or a
        # resumed run would draw other noise than the uninterrupted one.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=collate_fn, pin_memory=accelerator.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(seed))
        for batch in loader:
            yield send_to_device(batch, accelerator.device, non_blocking=True)

    return batches


# --- checkpoints ---------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None,
                  dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    # Copies on the CPU: safetensors refuses tensors that share memory (tied or aliased weights).
    tensors = {k: v.detach().to(device="cpu", dtype=dtype if dtype is not None and v.is_floating_point() else None,
                                copy=True).contiguous()
               for k, v in state.items()}
    save_file(tensors, os.fspath(path), metadata=dict(metadata) if metadata else None)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.fspath(path), device="cpu")


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_dirs(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (`step-*` folders with a `state.json`) in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / _STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `folder` (a run's checkpoint folder), or None."""
    found = checkpoint_dirs(folder)
    return found[-1] if found else None


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's `state.json`: `{"step", "processes", "parts", "extra"}`."""
    with open(Path(path) / _STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def save_checkpoint(folder: str | os.PathLike, step: int, accelerator, parts: Sequence[Part],
                    extra: Mapping[str, Any] | None = None, keep: int | None = None) -> Path:
    """Write `folder/step-<step>/` (layout in the module docstring); every process must call it.

    `extra` is JSON data stored in `state.json` (e.g. the training config). `keep` > 0 deletes all but
    the newest `keep` checkpoints afterwards. Returns the checkpoint's path.
    """
    folder = Path(folder)
    target = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = folder / f".{target.name}.partial"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), partial / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        for part in parts:
            _save_tensors(unwrap(part.model).state_dict(), partial / f"part-{part.name}.safetensors")
            if part.ema is not None:
                _save_tensors(part.ema.state_dict(), partial / f"part-{part.name}.ema.safetensors")
            torch.save({"optimizer": part.optimizer.state_dict(),
                        "scheduler": part.scheduler.state_dict() if part.scheduler is not None else None},
                       partial / f"part-{part.name}.optim.pt")
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            torch.save(scaler.state_dict(), partial / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"step": step, "processes": accelerator.num_processes, "parts": [p.name for p in parts],
                "extra": dict(extra or {})}
        with open(partial / _STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        if keep:
            for old in checkpoint_dirs(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", target)
    accelerator.wait_for_everyone()
    return target


def resume(path: str | os.PathLike, accelerator, parts: Sequence[Part]) -> int:
    """Restore `parts` (weights, EMA, optimizer, schedule position), the fp16 loss scale and this process's
    random states from a checkpoint; returns its step (the number of steps done).

    `path` is a checkpoint (`step-*`) or a folder of them (the newest complete one is used). The parts
    must be built exactly as when it was saved (same names, architectures and param groups).
    """
    path = Path(path)
    if not (path / _STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise InputError(f"no complete checkpoint in {path}; start without resuming or point at a step-* folder")
        path = latest
    info = checkpoint_info(path)
    saved = info.get("parts", [])
    if sorted(saved) != sorted(p.name for p in parts):
        raise InputError(f"{path} holds the parts {saved}, this run trains {[p.name for p in parts]}; "
                         "resume with the trainer that wrote it")
    for part in parts:
        model = unwrap(part.model)
        state = _load_tensors(path / f"part-{part.name}.safetensors")
        model.load_state_dict(state, strict=True)
        ema_file = path / f"part-{part.name}.ema.safetensors"
        if part.ema is not None:
            if not ema_file.is_file():
                raise InputError(f"{path} has no EMA for {part.name}; resume without EMA or from another checkpoint")
            part.ema.load_state_dict(_load_tensors(ema_file))
        optim = _torch_load(path / f"part-{part.name}.optim.pt")
        part.optimizer.load_state_dict(optim["optimizer"])
        if part.scheduler is not None and optim["scheduler"] is not None:
            # The schedule's shape (total steps, warm-up, final LR) follows this run's settings, so that a
            # run resumed with more steps stretches its remaining decay; its position comes from the file.
            factors = [dict(f.__dict__) for f in getattr(part.scheduler, "lr_lambdas", ())]
            part.scheduler.load_state_dict(optim["scheduler"])
            for factor, settings in zip(getattr(part.scheduler, "lr_lambdas", ()), factors):
                factor.__dict__.update(settings)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(_torch_load(path / "scaler.pt"))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file() and info.get("processes") == accelerator.num_processes:
        _set_rng_state(_torch_load(rng_file))
    else:
        log.warning("%s was saved by %s process(es), this run has %d: random draws will differ from an "
                    "uninterrupted run (the batches do not)", path, info.get("processes"), accelerator.num_processes)
    log.info("resumed from %s (step %d)", path, info["step"])
    return int(info["step"])


# --- the loop ------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> torch.Tensor:
    return value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))


class _LossLog:
    """Running sums of the step function's values between two log lines."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Any]) -> None:
        # Per-name counts: some values exist only on some micro-steps (a gradient norm under accumulation).
        for name, value in values.items():
            v = _scalar(value)
            self.sums[name] = self.sums[name] + v.to(self.sums[name].device) if name in self.sums else v
            self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self, accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        local = torch.stack([self.sums[n].to(accelerator.device) / self.counts[n] for n in names])
        total = accelerator.reduce(local, reduction="mean")
        self.sums, self.counts = {}, {}
        return dict(zip(names, total.tolist()))


def train_loop(accelerator, parts: Sequence[Part], step_fn: Callable[[Any, int], Mapping[str, Any]],
               batches: Callable[[int], Iterable[Any]], steps: int, *, start_step: int = 0, log_every: int = 50,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 1000,
               keep_checkpoints: int | None = 2, preview_fn: Callable[[int], Mapping[str, Any] | None] | None = None,
               preview_every: int = 0, log_file: str | os.PathLike | None = None,
               extra_state: Mapping[str, Any] | None = None) -> int:
    """Run optimizer steps `start_step + 1 … steps`; returns the number of steps done (`steps`).

    step_fn(batch, step): one micro-batch under `accelerator.accumulate` and `accelerator.autocast`; it calls
    `optimize` for each part and returns values to log (scalars or 0-d tensors), e.g. `{"loss": ..., "fm": ...}`.
    batches(first): an endless iterator of micro-batches from micro-step `first` on (`step_batches`).
    Every `log_every` steps the values' means over the steps since the last line (over all processes) and
    each part's LR go to the module logger and, on the main process, one JSON line to `log_file`
    (`{"step", "time_s", "steps_per_s", "lr/<part>", <values>}`); a non-finite mean stops training with an
    error. Every `checkpoint_every` steps and at the end a checkpoint is saved in `checkpoint_dir` (the
    newest `keep_checkpoints` kept; `extra_state` goes into its `state.json`). Every `preview_every` steps
    `preview_fn(step)` runs on the main process with the random states forked (so it changes nothing
    the training draws) and what it returns is logged too. An interrupted run (Ctrl+C, a lost machine)
    resumes from its newest checkpoint; a checkpoint is only ever saved between two whole steps.
    """
    if steps < start_step:
        raise InputError(f"the run is already at step {start_step}, past the requested {steps} steps")
    accumulation = accelerator.gradient_accumulation_steps
    models = [p.model for p in parts]
    for model in models:
        model.train()
    batch_iter = iter(batches(start_step * accumulation))
    log_path = Path(log_file) if log_file is not None else None
    if log_path is not None and accelerator.is_main_process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    running = _LossLog()
    started, last_time, last_step = time.monotonic(), time.monotonic(), start_step
    step = start_step

    def checkpoint() -> None:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, step, accelerator, parts, extra_state, keep_checkpoints)

    while step < steps:
        for micro in range(accumulation):
            batch = next(batch_iter)
            with accelerator.accumulate(*models), accelerator.autocast():
                values = step_fn(batch, step * accumulation + micro)
            running.add(values)
        step += 1
        if log_every and (step % log_every == 0 or step == steps):
            means = running.mean(accelerator)
            bad = [k for k, v in means.items() if not math.isfinite(v)]
            if bad:
                raise IMTalkerError(f"training diverged at step {step}: {', '.join(bad)} became NaN/inf; lower "
                                    "the learning rate, use fp32 or bf16, or resume from an earlier checkpoint")
            now = time.monotonic()
            record = {"step": step, "time_s": round(now - started, 3),
                      "steps_per_s": round((step - last_step) / max(now - last_time, 1e-9), 4)}
            record.update({f"lr/{p.name}": p.optimizer.param_groups[0]["lr"] for p in parts})
            record.update(means)
            last_time, last_step = now, step
            _write_record(accelerator, record, log_path)
        if preview_fn is not None and preview_every and step % preview_every == 0:
            _preview(accelerator, preview_fn, step, log_path)
        if checkpoint_every and step % checkpoint_every == 0 and step != steps:
            checkpoint()
    if step > start_step:
        checkpoint()
    return step


def _write_record(accelerator, record: Mapping[str, Any], log_path: Path | None) -> None:
    if not accelerator.is_main_process:
        return
    text = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
    log.info("%s", text)
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _preview(accelerator, preview_fn: Callable[[int], Mapping[str, Any] | None], step: int,
             log_path: Path | None) -> None:
    if accelerator.is_main_process:
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            result = preview_fn(step)
        if result:
            record = {"step": step, **{f"preview/{k}": float(_scalar(v)) for k, v in result.items()}}
            _write_record(accelerator, record, log_path)
    accelerator.wait_for_everyone()


# --- export --------------------------------------------------------------------------------------------------


def export_safetensors(source: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                       metadata: Mapping[str, str] | None = None, *, ema: EMA | None = None,
                       dtype: torch.dtype | None = None,
                       extra_tensors: Mapping[str, torch.Tensor] | None = None) -> int:
    """Write model weights as a bare `.safetensors` state dict that `imtalker_core.checkpoints` loads strictly
    (`load_generator(path)`, `load_renderer(path)`; bare keys, no `model.`/`gen.` prefix). A model's `cfg`
    is recorded in the metadata (`checkpoints.config_metadata`), so the loaders rebuild its size.

    source: the model (wrappers are removed) or a state dict. ema: write the EMA averages in place of the
    trainable parameters (needs a model). dtype: cast floating tensors (e.g. torch.float16). extra_tensors:
    entries written as they are (a generator's wav2vec2 copy under `audio_encoder.wav2vec2.*`). metadata:
    str → str, e.g. `{"imtalker_kind": "generator"}`. Written beside `path` and renamed when complete.
    Returns the number of tensors written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"export path {path} must end with .safetensors")
    if isinstance(source, nn.Module):
        state = ema.merged_state_dict(source) if ema is not None else dict(unwrap(source).state_dict())
    else:
        if ema is not None:
            raise InputError("exporting EMA weights needs the model, not a state dict")
        state = dict(source)
    if extra_tensors:
        state.update(extra_tensors)
    cfg = getattr(unwrap(source), "cfg", None) if isinstance(source, nn.Module) else None
    if cfg is not None and dataclasses.is_dataclass(cfg):
        # The model's configuration rides in the file, so a non-official size loads without naming it.
        metadata = {**config_metadata(cfg), **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        _save_tensors(state, part, metadata, dtype)
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()
    log.info("exported %d tensors to %s%s", len(state), path, " (EMA weights)" if ema is not None else "")
    return len(state)


#: Settings every trainer's config has and its command line sets the same way (`add_run_arguments`).
RUN_SETTINGS = ("mixed_precision", "cpu", "seed", "num_workers", "gradient_accumulation_steps", "log_every",
                "checkpoint_every", "keep_checkpoints")


def add_run_arguments(parser, defaults) -> None:
    """The command-line options of `RUN_SETTINGS`, defaulting to `defaults` (a trainer's config)."""
    parser.add_argument("--mixed-precision", choices=list(MIXED_PRECISION), default=defaults.mixed_precision)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers,
                        help="data loader processes per GPU")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)


def run_settings(args) -> dict[str, Any]:
    """`RUN_SETTINGS` as parsed by `add_run_arguments`, for a trainer config's constructor."""
    return {name: getattr(args, name) for name in RUN_SETTINGS}
