"""One training loop for every capret task (dual-stream DeepFashion2 model, CLIP4Cir Combiner, ...).

A task describes *what* to train through the :class:`TrainTask` protocol; :func:`train` owns *how*: device and
DDP setup, AMP, gradient accumulation, warmup + cosine schedule, clipping, non-finite detection, logging
(CSV + TensorBoard + tqdm), periodic validation with best-checkpoint keeping, time budget and exact resume.

Contract for tasks::

    class MyTask:
        def build_model(self) -> nn.Module                         # all trainable weights, loss heads too
        def param_groups(self, model) -> list[dict]                # optional; a "name" key names a group
        def train_dataloader(self, *, rank, world_size, epoch, seed) -> Iterable
        def training_step(self, model, batch) -> dict[str, Tensor] # scalar terms, "loss" is the total
        def evaluate(self, model) -> dict[str, float]              # validation metrics, may be {}
        def config_dict(self) -> dict                              # optional; saved in the checkpoint sidecar
        def setup(self, dist: DistContext) -> None                 # optional; first call: rank, world, device

Rules the loop relies on:

- ``train_dataloader`` must be deterministic given ``(rank, world_size, epoch, seed)`` (seed any shuffling
  generator from ``seed`` and ``epoch``; shard by ``rank``; give every rank the same number of equally sized
  batches, i.e. ``drop_last``). Resuming re-creates the epoch's loader and skips the batches already consumed.
- ``training_step`` receives the model *as wrapped for training* (``DistributedDataParallel`` under torchrun):
  call ``model(...)`` for the forward pass so DDP can synchronise gradients; use :func:`unwrap_model` for
  attribute access. It runs under autocast when AMP is on. Batches are moved to the device first (tensors inside
  dicts, lists and tuples; other values are passed through).
- ``evaluate`` runs on rank 0 only, under ``torch.no_grad()`` with the model in eval mode, on the unwrapped
  model. The global RNG states are saved before and restored after it, so evaluating more or less often never
  changes the training trajectory.

Resume (``resume="auto"`` or a checkpoint folder) restores model, optimizer, scheduler, AMP scaler, step, the
position in the data stream and the Python/numpy/torch(/CUDA) RNG states of every rank, and continues with the
same loss curve as an uninterrupted run (``tests/test_trainer.py`` checks this to 1e-6 on CPU).

A non-finite loss term (or, without fp16 loss scaling, a non-finite gradient norm) stops training with
:class:`NonFiniteLossError` naming the step and the term. Parameters are never updated with the bad gradients; a
checkpoint of the last completed step is written (if none exists yet) so the run can be inspected or resumed with
different settings.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capret.config import cfg, to_dict
from capret.engine import distributed as du
from capret.engine.checkpoint import (
    capture_rng_state,
    checkpoint_name,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from capret.engine.distributed import batch_size_of, move_to_device, resolve_amp_dtype, unwrap_model
from capret.engine.run_log import RunLog, supersede_previous_run
from capret.engine.schedule import build_optimizer, build_scheduler, resolve_param_groups
from capret.errors import ConfigError, DataError, NonFiniteLossError
from capret.progress import TrainingProgress

__all__ = [
    "NonFiniteLossError",
    "TrainTask",
    "TrainerConfig",
    "capture_rng_state",
    "move_to_device",
    "resolve_amp_dtype",
    "restore_rng_state",
    "seed_everything",
    "train",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """Settings of the shared training loop (a ``trainer:`` section in every task's YAML)."""

    output_dir: str = cfg(
        "runs/default", "run folder: checkpoints/, best/, train_log.csv, tensorboard/, config.yaml"
    )
    max_steps: int | None = cfg(1000, "optimisation steps (after accumulation); null to train for `epochs`")
    epochs: int | None = cfg(None, "passes over the training data; training stops at max_steps or epochs")
    grad_accum: int = cfg(1, "micro-batches accumulated per optimisation step")
    lr: float = cfg(1e-4, "base learning rate (groups from the task's param_groups may set their own)")
    weight_decay: float = cfg(0.01, "weight decay (decoupled for adamw)")
    optimizer: Literal["adamw", "adam", "sgd"] = cfg("adamw", "optimizer")
    betas: list[float] = cfg(factory=lambda: [0.9, 0.999], help="Adam/AdamW betas")
    eps: float = cfg(1e-8, "Adam/AdamW epsilon")
    momentum: float = cfg(0.9, "SGD momentum")
    warmup_steps: int = cfg(0, "linear warmup steps")
    schedule: Literal["cosine", "constant"] = cfg("cosine", "learning-rate schedule after warmup")
    min_lr_ratio: float = cfg(0.0, "cosine floor as a fraction of the base learning rate")
    clip_grad_norm: float | None = cfg(
        None, "clip the global gradient norm to this value; null = no clipping"
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = cfg(
        "auto", "mixed precision: auto = bf16 on CUDA if supported, else fp16 on CUDA, off on CPU"
    )
    log_every: int = cfg(10, "steps between log rows (CSV, TensorBoard, progress bar)")
    eval_every: int = cfg(0, "steps between validations; 0 = only at the end")
    save_every: int = cfg(0, "steps between checkpoints; 0 = only at the end")
    keep_last: int = cfg(2, "checkpoints kept in checkpoints/ (best/ is kept separately); 0 = keep all")
    monitor: str = cfg("map", "validation metric that selects the best checkpoint")
    monitor_mode: Literal["max", "min"] = cfg("max", "whether a larger or smaller monitor value is better")
    seed: int = cfg(0, "random seed (model init, data order, dropout)")
    device: str | None = cfg(None, "cpu, cuda or cuda:K; null = cuda:LOCAL_RANK if available else cpu")
    num_workers: int = cfg(0, "DataLoader worker processes (read by the task's train_dataloader)")
    max_seconds: float | None = cfg(
        None, "stop after this many seconds of training (checkpoint and evaluate)"
    )
    find_unused_parameters: bool = cfg(False, "DDP: allow parameters that get no gradient in a step")
    tensorboard: bool = cfg(True, "write TensorBoard event files under output_dir/tensorboard")
    progress: bool = cfg(
        True,
        "show a progress bar on rank 0: steps, or elapsed/remaining time when max_seconds is set "
        "(CAPRET_NO_PROGRESS=1 hides it too)",
    )


@runtime_checkable
class TrainTask(Protocol):
    """What a task provides to :func:`train` (see the module docstring for the rules)."""

    def build_model(self) -> nn.Module: ...

    def train_dataloader(self, *, rank: int, world_size: int, epoch: int, seed: int) -> Iterable[Any]: ...

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


def _validate(config: TrainerConfig) -> None:
    if config.max_steps is None and config.epochs is None:
        raise ConfigError("trainer: set max_steps or epochs (both are null)")
    for name in ("max_steps", "epochs"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{name} must be >= 1 or null, got {value}")
    for name in ("grad_accum", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(config, name)}")
    for name in ("eval_every", "save_every", "keep_last", "warmup_steps"):
        if getattr(config, name) < 0:
            raise ConfigError(f"trainer.{name} must be >= 0, got {getattr(config, name)}")
    if len(config.betas) != 2:
        raise ConfigError(f"trainer.betas must have two values, got {config.betas}")


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


class _Trainer:
    """State of one :func:`train` call; methods are the phases of the loop."""

    def __init__(
        self,
        task: Any,
        config: TrainerConfig,
        *,
        ctx: du.DistContext,
        resume: str | None,
        task_config: dict | None,
    ) -> None:
        self.task, self.config, self.ctx = task, config, ctx
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if task_config is None and hasattr(task, "config_dict"):
            task_config = task.config_dict()
        self.saved_config = {"trainer": to_dict(config), "task": task_config or {}}

        if callable(getattr(task, "setup", None)):
            task.setup(self.ctx)
        seed_everything(config.seed)
        self.model = task.build_model().to(self.ctx.device)
        groups = task.param_groups(self.model) if hasattr(task, "param_groups") else None
        self.optimizer = build_optimizer(
            resolve_param_groups(self.model, groups),
            name=config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.betas[0], config.betas[1]),
            eps=config.eps,
            momentum=config.momentum,
        )
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(
            self.optimizer,
            schedule=config.schedule,
            warmup_steps=config.warmup_steps,
            total_steps=self.total_steps,
            min_lr_ratio=config.min_lr_ratio,
        )
        self.amp_dtype = resolve_amp_dtype(config.amp, self.ctx.device)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.amp_dtype == torch.float16)

        self.step, self.epoch, self.index = 0, 0, 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.saved_steps: set[int] = set()
        self.last_eval_step: int | None = None
        pending_rng = None
        resume_path = resolve_resume(resume, self.out) if resume else None
        if resume_path is not None:
            pending_rng = self._load(resume_path)
        elif resume:
            logger.info("resume=auto: no checkpoint in %s yet, starting from scratch", self.ckpt_dir)
        seed_everything(config.seed + self.ctx.rank)
        self.pending_rng = pending_rng
        self.epoch_rng: dict[str, Any] | None = None
        self.train_model: nn.Module = self.model
        if self.ctx.is_distributed:
            self.train_model = DistributedDataParallel(
                self.model,
                device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        self.log: RunLog | None = None
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume_path is None:
                supersede_previous_run(self.out)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.saved_config, sort_keys=False))
            self.log = RunLog(
                self.out, resume_step=self.step if resume_path else None, tensorboard=config.tensorboard
            )

    # ---------------------------------------------------------------- setup
    def _loader(self, epoch: int) -> Iterable[Any]:
        return self.task.train_dataloader(
            rank=self.ctx.rank, world_size=self.ctx.world_size, epoch=epoch, seed=self.config.seed
        )

    def _total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        loader = self._loader(0)
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(
                "trainer.epochs needs a train_dataloader with len(); set trainer.max_steps instead"
            ) from None
        return max(1, (per_epoch * int(self.config.epochs or 1)) // self.config.grad_accum)

    def _states(self) -> dict[str, Any]:
        """The objects whose states a checkpoint holds (saved and restored alike); the scaler only when enabled."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler if self.scaler.is_enabled() else None,
        }

    def _load(self, path: Path) -> dict[str, Any] | None:
        loaded = load_checkpoint(
            path,
            **self._states(),
            config=self.saved_config,
        )
        state = loaded.trainer_state
        self.step = loaded.step
        self.epoch, self.index = int(state.get("epoch", loaded.epoch)), int(state.get("index", 0))
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.last_metrics = dict(loaded.metrics)
        saved = (int(state.get("world_size", 1)), int(state.get("grad_accum", self.config.grad_accum)))
        if saved != (self.ctx.world_size, self.config.grad_accum):
            logger.warning(
                "resuming %s saved with (world_size, grad_accum)=%s under %s: data position and RNG streams no "
                "longer line up; the run continues, but not exactly",
                path,
                saved,
                (self.ctx.world_size, self.config.grad_accum),
            )
        ranks = (loaded.rng_state or {}).get("ranks") or []
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.index)
        return ranks[self.ctx.rank] if len(ranks) == self.ctx.world_size else None

    # ---------------------------------------------------------------- data
    def _stream(self) -> Iterator[tuple[int, int, Any]]:
        """(epoch, index in epoch, batch) from the stored position on, over epochs, RNG restored on arrival."""
        epoch, skip, pending = self.epoch, self.index, self.pending_rng
        self.pending_rng = None
        while self.config.epochs is None or epoch < self.config.epochs:
            # The RNG state at the epoch start is checkpointed too: creating the loader's iterator may draw from
            # it (DataLoader worker seeds), so a resume restores it before re-creating and skipping.
            if pending is not None and pending.get("epoch") is not None:
                restore_rng_state(pending["epoch"])
            self.epoch_rng = capture_rng_state()
            iterator = iter(self._loader(epoch))
            consumed = 0
            for _ in range(skip):
                if next(iterator, None) is None:
                    raise ValueError(
                        f"resume: epoch {epoch} yields {consumed} batches but the checkpoint consumed {skip}; "
                        "train_dataloader must be deterministic given (rank, world_size, epoch, seed)"
                    )
                consumed += 1
            skip = 0
            if pending is not None:
                restore_rng_state(pending["step"])
                pending = None
            for batch in iterator:
                yield epoch, consumed, batch
                consumed += 1
            if consumed == 0:
                raise DataError(f"train_dataloader(epoch={epoch}) yielded no batches")
            epoch += 1

    # ---------------------------------------------------------------- checkpoints
    def _rng_now(self) -> dict[str, Any]:
        return {"step": capture_rng_state(), "epoch": self.epoch_rng}

    def _trainer_state(self, epoch: int, index: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "index": index,
            "best": self.best,
            "best_step": self.best_step,
            "world_size": self.ctx.world_size,
            "grad_accum": self.config.grad_accum,
            "monitor": self.config.monitor,
        }

    def _save(self, directory: Path, *, epoch: int, index: int, rng: dict[str, Any]) -> Path:
        """Collective: gathers every rank's RNG states (``{"step": now, "epoch": at epoch start}``), rank 0 writes."""
        ranks = du.all_gather_object(rng, world_size=self.ctx.world_size)
        if self.ctx.is_main:
            save_checkpoint(
                directory,
                **self._states(),
                step=self.step,
                epoch=epoch,
                rng_state={"ranks": ranks},
                config=self.saved_config,
                metrics=self.last_metrics,
                trainer_state=self._trainer_state(epoch, index),
            )
        du.barrier(world_size=self.ctx.world_size)
        return directory

    def _save_periodic(self, *, epoch: int, index: int) -> Path:
        path = self._save(
            self.ckpt_dir / checkpoint_name(self.step), epoch=epoch, index=index, rng=self._rng_now()
        )
        self.saved_steps.add(self.step)
        if self.ctx.is_main:
            prune_checkpoints(self.ckpt_dir, keep_last=self.config.keep_last)
        return path

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, *, epoch: int, index: int) -> None:
        self.last_eval_step = self.step
        metrics: dict[str, float] = {}
        if self.ctx.is_main:
            rng = capture_rng_state()
            self.model.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in (self.task.evaluate(self.model) or {}).items()}
            self.model.train()
            restore_rng_state(rng)
            self.last_metrics = metrics
            if metrics and self.log is not None:
                self.log.write("eval", {"step": self.step, **metrics})
        improved = False
        if self.ctx.is_main and metrics:
            if self.config.monitor not in metrics:
                logger.warning(
                    "trainer.monitor=%r is not among the validation metrics %s; no best checkpoint is kept",
                    self.config.monitor,
                    sorted(metrics),
                )
            elif _is_better(metrics[self.config.monitor], self.best, self.config.monitor_mode):
                self.best, self.best_step, improved = metrics[self.config.monitor], self.step, True
        if du.broadcast_flag(improved, device=self.ctx.device, world_size=self.ctx.world_size):
            self._save(self.out / "best", epoch=epoch, index=index, rng=self._rng_now())
        du.barrier(world_size=self.ctx.world_size)

    # ---------------------------------------------------------------- non-finite
    def _non_finite(self, *, terms: list[str], boundary: tuple[int, int, dict[str, Any]]) -> None:
        epoch, index, rng = boundary
        path: Path | None = None
        if self.step > 0:
            path = self.ckpt_dir / checkpoint_name(self.step)
            if self.step not in self.saved_steps:
                self._save(path, epoch=epoch, index=index, rng=rng)
        failing = self.step + 1
        where = f"last good checkpoint (step {self.step}): {path}" if path else "no update had completed yet"
        raise NonFiniteLossError(
            f"non-finite value in {', '.join(terms)} at optimisation step {failing} (epoch {epoch}); training "
            f"stopped before applying it. {where}. Lower trainer.lr, enable trainer.clip_grad_norm, or use "
            "amp=bf16/off (fp16 overflows in margin losses such as ArcFace).",
            step=failing,
            terms=terms,
            checkpoint=path,
        )

    # ---------------------------------------------------------------- the loop
    def _micro_step(self, batch: Any, *, sync: bool) -> dict[str, torch.Tensor]:
        batch = move_to_device(batch, self.ctx.device)
        no_sync = getattr(self.train_model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else nullcontext()
        with context:
            with torch.autocast(
                device_type=self.ctx.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                terms = self.task.training_step(self.train_model, batch)
            if not isinstance(terms, dict) or "loss" not in terms:
                got = sorted(terms) if isinstance(terms, dict) else type(terms).__name__
                raise ValueError(f"training_step must return a dict with a 'loss' entry, got {got}")
            detached = {}
            for name, value in terms.items():
                value = torch.as_tensor(value)
                if value.numel() != 1:
                    raise ValueError(
                        f"training_step term {name!r} must be a scalar, got shape {tuple(value.shape)}"
                    )
                detached[name] = value.detach().float().reshape(())
            finite = bool(torch.isfinite(torch.stack(list(detached.values()))).all())
            if not du.all_true(finite, device=self.ctx.device, world_size=self.ctx.world_size):
                bad = [k for k, v in detached.items() if not torch.isfinite(v)] or [
                    "a loss term on another rank"
                ]
                raise _NonFiniteSignal(bad)
            self.scaler.scale(terms["loss"] / self.config.grad_accum).backward()
        return detached

    def _optimizer_step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            raise _NonFiniteSignal(["gradient norm"])
        self.step_lrs = {f"lr/{g['name']}": float(g["lr"]) for g in self.optimizer.param_groups}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with (
            warnings.catch_warnings()
        ):  # fp16 steps skipped by the scaler still advance the schedule, by design
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def run(self) -> dict[str, Any]:
        config, ctx = self.config, self.ctx
        self.model.train()
        stream = self._stream()
        bar = TrainingProgress(
            total_steps=self.total_steps,
            initial_step=self.step,
            max_seconds=config.max_seconds,
            enabled=ctx.is_main and config.progress,
        )
        start = window_start = time.perf_counter()
        window: dict[str, list[Any]] = {}  # term -> [sum, count] over the micro-batches since the last row
        window_steps = window_samples = 0
        last_terms: dict[str, float] = {}
        stop_reason = "max_steps"
        epoch, index = self.epoch, self.index
        try:
            while self.step < self.total_steps:
                boundary = (epoch, index, self._rng_now())
                step_terms: list[dict[str, torch.Tensor]] = []
                micro = 0
                try:
                    for micro in range(config.grad_accum):
                        item = next(stream, None)
                        if item is None:
                            break
                        epoch, index, batch = item
                        index += 1
                        window_samples += batch_size_of(batch) * ctx.world_size
                        step_terms.append(self._micro_step(batch, sync=micro == config.grad_accum - 1))
                    else:
                        micro = config.grad_accum
                    if micro < config.grad_accum:
                        stop_reason = "epochs"
                        self.optimizer.zero_grad(set_to_none=True)
                        break
                    norm = self._optimizer_step()
                except _NonFiniteSignal as signal:
                    self._non_finite(terms=signal.terms, boundary=boundary)
                self.step += 1
                bar.update(self.step, elapsed=time.perf_counter() - start)
                for terms in [*step_terms, {"grad_norm": norm}]:
                    for name, value in terms.items():
                        entry = window.setdefault(name, [0.0, 0])
                        entry[0], entry[1] = entry[0] + value, entry[1] + 1
                window_steps += 1
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    last_terms = self._log(window, window_steps, window_samples, window_start, epoch)
                    bar.set_loss(last_terms.get("loss", float("nan")))
                    window, window_steps, window_samples = {}, 0, 0
                    window_start = time.perf_counter()
                if config.eval_every and self.step % config.eval_every == 0:
                    self._evaluate(epoch=epoch, index=index)
                if config.save_every and self.step % config.save_every == 0:
                    self._save_periodic(epoch=epoch, index=index)
                over_budget = (
                    config.max_seconds is not None and time.perf_counter() - start > config.max_seconds
                )
                if du.broadcast_flag(over_budget, device=ctx.device, world_size=ctx.world_size):
                    stop_reason = "max_seconds"
                    break
            if window_steps:
                last_terms = self._log(window, window_steps, window_samples, window_start, epoch)
            if self.last_eval_step != self.step:
                self._evaluate(epoch=epoch, index=index)
            last = self.ckpt_dir / checkpoint_name(self.step)
            if self.step not in self.saved_steps and self.step > 0:
                last = self._save_periodic(epoch=epoch, index=index)
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
        return {
            "steps": self.step,
            "epoch": epoch,
            "stop_reason": stop_reason,
            "seconds": time.perf_counter() - start,
            "final": last_terms,
            "metrics": self.last_metrics,
            "monitor": config.monitor,
            "best": self.best,
            "best_step": self.best_step,
            "output_dir": str(self.out),
            "last_checkpoint": str(last) if self.step > 0 else None,
            "best_checkpoint": str(self.out / "best") if self.best_step is not None else None,
        }

    def _log(
        self, window: dict[str, list[Any]], steps: int, samples: int, started: float, epoch: int
    ) -> dict[str, float]:
        """Write one log row: each term's mean over its micro-batches since the last row, over all ranks."""
        names = sorted(window)
        if self.ctx.is_distributed:  # a term may be missing on some rank: align on the union of names
            gathered = du.all_gather_object(names, world_size=self.ctx.world_size)
            names = sorted({n for rank_names in gathered for n in rank_names})
        zero = [torch.zeros((), device=self.ctx.device), 0]
        sums = torch.stack(
            [torch.as_tensor(window.get(n, zero)[0], device=self.ctx.device).float() for n in names]
        )
        counts = torch.tensor([float(window.get(n, zero)[1]) for n in names], device=self.ctx.device)
        totals = du.all_reduce_sum(torch.stack([sums, counts]), world_size=self.ctx.world_size)
        terms = {n: float(v) for n, v in zip(names, (totals[0] / totals[1]).tolist())}
        if self.log is not None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            row: dict[str, Any] = {"step": self.step, "epoch": epoch, **terms}
            row.update(self.step_lrs)  # the rates the last update used
            row["samples_per_s"] = samples / elapsed
            row["steps_per_s"] = steps / elapsed
            if self.scaler.is_enabled():
                row["amp_scale"] = float(self.scaler.get_scale())
            self.log.write("train", row)
        return terms


class _NonFiniteSignal(Exception):
    """Internal: raised inside a step, turned into NonFiniteLossError after the last good state is saved."""

    def __init__(self, terms: list[str]) -> None:
        super().__init__(", ".join(terms))
        self.terms = terms


def train(
    task: Any, config: TrainerConfig, *, resume: str | None = None, task_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train ``task`` with the shared loop; returns final metrics and paths (see ``_Trainer.run``).

    Args:
        task: an object following :class:`TrainTask` (``param_groups`` and ``config_dict`` optional).
        config: loop settings.
        resume: None (fresh run; old logs in ``output_dir`` are replaced), ``"auto"`` (latest checkpoint in
            ``output_dir`` if any) or a checkpoint / run folder.
        task_config: JSON-able task configuration for the sidecar; defaults to ``task.config_dict()``.

    Under torchrun, ``train`` joins the process group from the environment and destroys it at the end if it
    created it; a program that calls ``train`` several times creates the group first
    (``capret.engine.distributed.init_distributed``) and cleans it up itself.

    Raises:
        NonFiniteLossError: a loss term or the gradient norm became NaN/inf (see the module docstring).
        OutputLockedError: another live run is writing ``config.output_dir`` (its PID is named).
    """
    _validate(config)
    for method in ("build_model", "train_dataloader", "training_step", "evaluate"):
        if not callable(getattr(task, method, None)):
            raise TypeError(f"task {type(task).__name__} has no {method}() method (see TrainTask)")
    ctx = du.init_distributed(config.device)
    try:
        # One writer per run folder, taken before anything in it is read, moved aside or written: two runs
        # into one folder used to both finish, each moving the other's checkpoints to superseded/.
        with du.exclusive_output_on_main(config.output_dir, what="training output folder", ctx=ctx):
            return _Trainer(task, config, ctx=ctx, resume=resume, task_config=task_config).run()
    finally:
        du.cleanup_distributed(ctx)
