"""The one train loop for every method and engine.

Per step: `accum_steps` micro-batches forward/backward, gradient norm (and clipping), one
finiteness check, optimizer and schedule step, then the method's own hook (EMA, centers, ...).
Everything a step depends on -- weights, optimizer, schedule, RNG, data position -- is in the
checkpoint, so an interrupted run resumed from step N repeats exactly what it would have done.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from data_pipeline.loader import merge_states
from pretrain.checkpoint import CheckpointManager, dcp_load, find_checkpoint, load_rank_state, read_meta, resolve_resume
from pretrain.ckpt.load import (
    PretrainedEncoder,
    PretrainedTeacher,
    PretrainingRun,
    check_encoder_checkpoint,
    check_teacher_checkpoint,
    load_encoder_state,
    load_teacher_state,
    pretraining_run,
)
from pretrain.config import Config, ConfigError
from pretrain.data import build_train_loader, check_data_spec
from pretrain.distributed import all_reduce_mean, gather_floats
from pretrain.engines import build_engine
from pretrain.eval.classify import classification_top1, percent_tag
from pretrain.eval.features import count_classes, split_features
from pretrain.eval.knn import knn_top1
from pretrain.flops import device_peak_flops
from pretrain.logs import setup_logging
from pretrain.memory import peak_memory_gb
from pretrain.methods.registry import (
    METHODS,
    build_device_transform,
    build_method,
    encoder_checkpoint,
    flops_per_sample,
    preflight_method,
    teacher_checkpoint,
)
from pretrain.optim import (
    WeightDecaySchedule,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    set_hyperparameters,
)
from pretrain.progress import Progress
from pretrain.recipes import config_from_saved
from pretrain.resume_changes import check_changes
from pretrain.rng import rng_state, seed_everything, seed_step, set_rng_state
from pretrain.runtime.preemption import StopRequest
from pretrain.runtime.run_lock import RunLock, check_writable
from pretrain.runtime.watchdog import Watchdog
from pretrain.runtime.world import host_tags, world_from_env
from pretrain.tracking import Tracker, flatten_config, resolve_tracking_uri
from pretrain.tracking.local_record import MetricsLog, Reconcile, update_run_file
from pretrain.tracking.runs import log_metric_best_effort
from pretrain.tracking.system_metrics import SystemMetrics

log = logging.getLogger("pretrain.train")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient; the last good state was checkpointed."""


@dataclass
class StepStats:
    """What one call of `train_step` did, reduced over ranks."""

    loss: float
    grad_norm: float
    extras: dict[str, float]  # the method's other outputs (means over micro-batches and ranks)
    stop_requested: bool  # some rank was signalled to stop: every rank stops after this step
    applied: bool  # False: a non-finite loss or gradient, nothing was updated
    lr: float  # the learning rate of this step
    batch: dict[str, Any]  # the last micro-batch, for pictures
    seconds: float = 0.0  # this rank's time for the step


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step run by this process
    checkpoint: Path | None = None
    mlflow_run_id: str | None = None
    skipped_steps: int = 0
    stopped_by: str | None = None  # the signal that stopped the run before its last step (preemption)
    step_ends: list[float] = field(default_factory=list)  # perf_counter() after each optimizer step (benchmarks)
    test_top1: float | None = None  # a classifier's top-1 on the test split at the end (fine-tuning)
    test_images: int = 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def load_full_state(method: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the method's parameters and buffers of those names; a name it lacks is a bug."""
    unexpected = set(state) - set(method.state_dict())
    if unexpected:
        raise KeyError(f"initial weights for parameters the method does not have: {sorted(unexpected)[:5]}")
    method.load_state_dict(state, strict=False)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Holds the pieces of a run; `fit()` is the loop."""

    def __init__(
        self,
        cfg: Config,
        loader: Any = None,
        force_lock: bool = False,
        tags: dict[str, str] | None = None,
        load_teacher: bool = True,
    ):
        """`loader`: batches to train on instead of data.shards' (e.g. the benchmark's synthetic batch).
        `force_lock`: take over the run directory's lock from a holder on another host (`--force`).
        `tags`: set on the MLflow run besides the host's (a fine-tune's link to its pretraining run).
        `load_teacher`: False leaves a distillation's frozen teacher at its random init, its checkpoint unread
        (the benchmark on synthetic data times the same compute)."""
        self.cfg = cfg
        self._load_teacher = load_teacher
        self.world = world_from_env()
        self.run_dir = cfg.run_dir
        self._tags = dict(tags or {})
        self._own_data = loader is None  # the run reads data.shards (not a benchmark's synthetic batch)
        # Before any work: the data spec names shards, the method's files fit it, the run directory is writable
        # and this job's alone, and a resume names a complete checkpoint whose settings may change as asked.
        if loader is None:
            check_data_spec(cfg)
        preflight_method(cfg)
        self.encoder_checkpoint = encoder_checkpoint(cfg)
        self.encoder: PretrainedEncoder | None = None  # the encoder a new run starts from, checked, loaded later
        self.pretraining: PretrainingRun | None = None  # where the encoder came from: linked in MLflow
        if self.encoder_checkpoint:
            self.encoder = check_encoder_checkpoint(self.encoder_checkpoint, cfg)
            self.pretraining = pretraining_run(self.encoder_checkpoint)
            self._tags = {**self.pretraining.tags(), **self._tags}
        self.engine = build_engine(cfg, self.world)  # checks the engine's options against the device
        check_writable(self.run_dir)
        self.lock = RunLock(self.run_dir)
        self._force_lock = force_lock
        if self.world.is_main:
            self.lock.acquire(force_lock)
        try:
            self._setup(loader)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, loader: Any) -> None:
        cfg = self.cfg
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", cfg.train.keep_last, self.world.rank, self.world.world_size
        )
        self.resumed_from = resolve_resume(cfg.train.resume, self.checkpoints)
        self._resume_meta = read_meta(self.resumed_from) if self.resumed_from is not None else None
        if self._resume_meta is not None:
            self._check_resumable(self._resume_meta, self.resumed_from)
        # A distillation's teacher: checked against this config now; a resumed run has it in its checkpoint.
        self.teacher: PretrainedTeacher | None = None
        if (source := teacher_checkpoint(cfg)) and self.resumed_from is None and self._load_teacher:
            self.teacher = check_teacher_checkpoint(source, cfg)
            self._tags = {**pretraining_run(self.teacher.path).tags("teacher"), **self._tags}
        # Data first: a missing or empty shard spec fails before a model exists.
        self.loader = loader if loader is not None else build_train_loader(cfg, self.world)
        self.device_transform = build_device_transform(cfg)
        setup_logging(self.run_dir, self.world.rank)

        seed_everything(cfg.run.seed)
        self.samples_per_step = cfg.data.batch_size * cfg.optim.accum_steps * self.world.world_size
        self.peak_lr = scaled_lr(cfg.optim, self.samples_per_step)
        self.flops = flops_per_sample(cfg)  # analytic {"forward", "train"} per sample, None if not counted
        self.peak_flops = device_peak_flops(self.engine.device, cfg.train.peak_tflops)
        with self.engine.init_context():
            self.method = build_method(cfg)  # hooks and pictures; `model` is what the engine wrapped for training
        initial = {}
        if self.encoder is not None and self.resumed_from is None:
            _, encoder, source = load_encoder_state(self.encoder)
            initial = self.method.initial_state(encoder)
            log.info("encoder weights from %s", source)
        if self.teacher is not None:
            initial |= self.method.teacher_state(load_teacher_state(self.teacher, self.method.teacher_sources()))
            log.info("frozen teacher from %s", self.teacher.path)
        on_meta = any(p.is_meta for p in self.method.parameters())
        if initial and not on_meta:
            load_full_state(self.method, initial)
        no_decay, lr_scale = self.method.no_weight_decay(), self.method.lr_scale
        # Networks with optimizers of their own (a GAN's two players): each its settings and peak rate.
        self.players = self.method.players()
        self.player_optims = {
            player.name: (settings := player.settings.resolve(cfg.optim), scaled_lr(settings, self.samples_per_step))
            for player in self.players
        } or None
        if bool(self.players) != METHODS[cfg.method.name].players:  # what config validation relied on
            raise RuntimeError(f"method {cfg.method.name!r}: its players() and its MethodSpec.players disagree")
        owned = {p.name: (p.modules, *self.player_optims[p.name]) for p in self.players} if self.players else None
        self.model, self.optimizer = self.engine.setup(
            self.method, lambda model: build_optimizer(model, cfg.optim, self.peak_lr, no_decay, lr_scale, owned)
        )
        # Each player's parameters as its optimizer groups hold them (FSDP2's sharded ones, under FSDP2).
        self._player_params: dict[str, list[torch.nn.Parameter]] = {}
        for group in self.optimizer.param_groups if self.players else []:
            self._player_params.setdefault(group["player"], []).extend(group["params"])
        if initial and on_meta:  # shards materialized by the engine: each rank takes its part of the full tensors
            set_model_state_dict(self.model, initial, options=StateDictOptions(full_state_dict=True, strict=False))
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, cfg.train.steps, self.peak_lr, players=self.player_optims
        )
        self.weight_decay = WeightDecaySchedule(self.optimizer, cfg.optim, cfg.train.steps, self.player_optims)
        self.ema_pairs = self.method.ema_pairs()
        self.step = 0
        self._samples_before = 0  # samples seen before self._samples_from (batch sizes may change on resume)
        self._samples_from = 0
        self.mlflow_run_id: str | None = None
        self.job_key = uuid.uuid4().hex  # replaced by the checkpoint's on resume
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        elif cfg.train.init_from:
            self._load_initial_weights(cfg.train.init_from)

        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl") if self.world.is_main else None
        replay: list = []
        if self.metrics_log is not None and self.resumed_from is not None:
            # Steps after the checkpoint will be re-run: their lines go; what is left up to the checkpoint
            # is replayed to MLflow where the server lacks it (points a killed process never sent).
            replay = self.metrics_log.truncate_after(self.step)
        tags = {**host_tags(self.world), **({"git_commit": c} if (c := _git_commit()) else {}), **self._tags}
        self.tracker = Tracker(
            resolve_tracking_uri(cfg.tracking.uri, self.run_dir),
            experiment=cfg.tracking.experiment,
            run_name=cfg.run.name,
            run_id=self.mlflow_run_id,
            tags=tags,
            flush_interval=cfg.tracking.flush_interval,
            enabled=cfg.tracking.enabled and self.world.is_main,
            job_key=self.job_key,
            local_dir=self.run_dir / "tracking",
            resume=Reconcile(self.step, replay) if self.resumed_from is not None else None,
            on_run=lambda run_id: update_run_file(self.run_dir, run_id=run_id),
        )
        if self.world.is_main:
            update_run_file(
                self.run_dir,
                job_key=self.job_key,
                run_id=self.mlflow_run_id,
                tracking_uri=self.tracker.tracking_uri,
                experiment=cfg.tracking.experiment,
                run_name=cfg.run.name,
                tags=tags,
                status="RUNNING",
            )
            config_file = self.run_dir / "config.json"
            config_file.write_text(json.dumps(cfg.to_dict(), indent=2))
            # Params go on every start: MLflow keeps the first value, and a first process that never
            # reached the server delivered none.
            self.tracker.log_params(flatten_config(cfg.to_dict()))
            self.tracker.log_artifact_file(str(config_file))
            self._record_label_subset()
            log.info("tracking: %s", self.tracker.ui_hint())

    def _record_label_subset(self) -> None:
        """A run on a label fraction keeps the keys it trained on (label_subset.json, also in MLflow)."""
        subset = getattr(self.loader, "subset", None)
        if subset is None:
            return
        record = self.run_dir / "label_subset.json"
        record.write_text(json.dumps(subset.record()) + "\n")
        self.tracker.log_params({"label_subset_size": len(subset.keys), "label_subset_sha256": subset.digest})
        self.tracker.log_artifact_file(str(record))

    # ------------------------------------------------------------------ checkpoint state

    def _rank_state(self, rng: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "rng": rng if rng is not None else rng_state(),
            "data": data if data is not None else self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def save_checkpoint(self, rank_state: dict[str, Any] | None = None, background: bool = False) -> Path | None:
        """Write a checkpoint of the current step; in the background (published later by `poll`) if asked."""
        meta = {
            "engine": self.engine.name,
            "config": self.cfg.to_dict(),
            "mlflow_run_id": self.tracker.run_id or self.mlflow_run_id,
            "job_key": self.job_key,
            "samples_seen": self._samples_before + (self.step - self._samples_from) * self.samples_per_step,
        }
        if self.metrics_log is not None:
            self.metrics_log.sync()  # every metric up to this step is on disk before the checkpoint exists
        rank_state = rank_state or self._rank_state()
        model, optimizer, fmt = self.model, self.optimizer, self.engine.checkpoint_format
        if background:
            start = lambda directory: self.engine.save_tensors_async(model, optimizer, directory)  # noqa: E731
            self.checkpoints.save_async(self.step, start, rank_state, meta, fmt)
            return None
        write = lambda directory: self.engine.save_tensors(model, optimizer, directory)  # noqa: E731
        return self.checkpoints.save(self.step, write, rank_state, meta, fmt)

    def _check_resumable(self, meta: dict[str, Any], path: Path, weights_only: bool = False) -> None:
        """Refuse changes a resume cannot honour (the network, the data order), report the others with what
        each does (`pretrain/resume_changes.py` has the rule).

        The saved config is read with today's schema first, so a field added since (at its default,
        which keeps the old behaviour) is no change; one set otherwise is named."""
        saved = meta["config"]
        try:
            saved = config_from_saved(saved).to_dict()
        except ConfigError:
            pass  # compare as saved: every difference is reported
        before, now = flatten_config(saved), flatten_config(self.cfg.to_dict())
        changes = check_changes(before, now, int(meta.get("step", 0)), path, weights_only)
        if changes and not weights_only:
            log.warning("resuming from %s with changed settings:\n  %s", path, "\n  ".join(changes))

    def _load_initial_weights(self, spec: str) -> None:
        """train.init_from: the model weights of a DCP checkpoint; optimizer, schedule and data start fresh."""
        path = find_checkpoint(spec)
        meta = read_meta(path)
        if meta.get("format", "dcp") != "dcp":
            raise ConfigError(
                f"train.init_from: {path} is a {meta.get('format')} checkpoint; `pretrain ckpt convert --to dcp` it"
            )
        if self.engine.name == "deepspeed":
            raise ConfigError("train.init_from: not available with engine.kind = deepspeed; start on a DCP engine")
        self._check_resumable(meta, path, weights_only=True)
        state = {"model": get_model_state_dict(self.model)}
        dcp_load(state, path)
        set_model_state_dict(self.model, state["model"])
        log.info("model weights from %s (step %s); optimizer and schedule start fresh", path, meta.get("step"))

    def _restore(self, path: Path) -> None:
        meta = self._resume_meta
        if "imported_from" in meta:
            raise ConfigError(
                f"train.resume: {path} was imported (`pretrain ckpt import`) and holds no optimizer or schedule; "
                f'start from it with train.init_from="{path}"'
            )
        self.engine.load_tensors(self.model, self.optimizer, path)
        rank_state = load_rank_state(path, self.world.rank)
        if meta["world_size"] != self.world.world_size:
            saved = [load_rank_state(path, rank) for rank in range(meta["world_size"])]
            merge = getattr(self.loader, "merge_states", merge_states)  # a loader's own rule (DALI's)
            rank_state = {**(rank_state or saved[0]), "data": merge([s["data"] for s in saved])}
            old = meta["config"]
            before = old["data"]["batch_size"] * old["optim"]["accum_steps"] * meta["world_size"]
            log.warning(
                "checkpoint written at world size %d, resuming at %d: model and optimizer are resharded; data "
                "streams continue where their layout allows; the global batch is %d samples (was %d)%s",
                meta["world_size"],
                self.world.world_size,
                self.samples_per_step,
                before,
                f", and the learning rate follows it (optim.lr_scaling = {self.cfg.optim.lr_scaling})"
                if before != self.samples_per_step and self.cfg.optim.lr_scaling != "none"
                else "",
            )
        self.step = meta["step"]
        # The schedule is rebuilt from today's settings at the saved step (equal to the saved one when
        # nothing changed); the optimizer's hyperparameters come from the config, its moments from the file.
        set_hyperparameters(self.optimizer, self.cfg.optim, self.player_optims)
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.optim, self.cfg.train.steps, self.peak_lr, self.step, self.player_optims
        )
        self.loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        self._samples_before = int(meta.get("samples_seen", self.step * self.samples_per_step))
        self._samples_from = self.step
        self.mlflow_run_id = meta.get("mlflow_run_id")
        self.job_key = meta.get("job_key", self.job_key)
        log.info("resumed from %s at step %d", path, self.step)

    def _system_metrics(self) -> SystemMetrics | None:
        """CPU/GPU utilization, memory and power into the run, when tracked and switched on."""
        if not (self.cfg.tracking.system_metrics and self.tracker.enabled):
            return None
        try:
            return SystemMetrics(self.tracker, lambda: self.step).start()
        except Exception:  # psutil or MLflow's samplers missing or failing: the run goes on without them
            log.warning("tracking: system metrics unavailable", exc_info=True)
            return None

    # ------------------------------------------------------------------ the loop

    def fit(self, until: int | None = None, save_final: bool = True) -> TrainResult:
        """Train to `train.steps`, or stop early after step `until` (the schedule still spans
        train.steps), e.g. for jobs that get a fixed slice of a cluster's time. `save_final=False`
        skips the checkpoint and the test-split score at the end (benchmarks)."""
        cfg = self.cfg
        if self.world.is_main and not self.lock.held:  # a second fit() of this trainer
            self.lock.acquire(self._force_lock)
        stop = cfg.train.steps if until is None else min(until, cfg.train.steps)
        result = TrainResult(step=self.step, mlflow_run_id=self.mlflow_run_id)
        self._progress = Progress(cfg.train.steps, self.step, self.samples_per_step)
        self._window: dict[str, list[float]] = {}
        self._last_saved = self.step if self.resumed_from is not None else -1
        consecutive_skips = 0
        batches = iter(self.loader)
        status = "FAILED"
        stop_request = StopRequest().install()  # after the loader's workers start: they keep the default
        log_file = self.run_dir / "logs" / f"rank_{self.world.rank:05d}.log"
        watchdog = Watchdog(cfg.train.watchdog_timeout, log_file, self.world.rank).start()
        system = self._system_metrics()
        try:
            while self.step < stop:
                before = (rng_state(), self.loader.state_dict()) if cfg.train.on_nonfinite == "stop" else None
                stats = self.train_step(batches, stop_request.requested)
                watchdog.beat()
                if not stats.applied:
                    consecutive_skips += 1
                    result.skipped_steps += 1
                    if cfg.train.on_nonfinite == "stop" or consecutive_skips > cfg.train.max_nonfinite_skips:
                        self._stop_nonfinite(stats.loss, stats.grad_norm, before, result)
                    log.warning(
                        "step %d: non-finite loss %s / grad norm %s, step skipped",
                        self.step + 1,
                        stats.loss,
                        stats.grad_norm,
                    )
                    continue
                consecutive_skips = 0
                result.losses.append(stats.loss)
                result.step_ends.append(time.perf_counter())
                self._periodic(stats, result)
                if stats.stop_requested:
                    result.stopped_by = stop_request.name or "a stop signal on another rank"
                    log.warning("step %d: stopping on %s, writing a checkpoint", self.step, result.stopped_by)
                    break
            if save_final and self._last_saved != self.step:
                result.checkpoint = self.save_checkpoint()
            result.checkpoint = self.checkpoints.wait() or result.checkpoint
            if save_final and self._own_data and not result.stopped_by and self.step == cfg.train.steps:
                self._score_test_split(result)
            status = "KILLED" if result.stopped_by else "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            watchdog.stop()
            stop_request.restore()
            if system is not None:
                system.stop()
            self.tracker.close(timeout=cfg.tracking.close_timeout, status=status)
            if self.metrics_log is not None:
                self.metrics_log.close()
                try:
                    update_run_file(self.run_dir, run_id=self.tracker.run_id, status=status)
                except OSError as exc:  # a full disk: the error being raised says more
                    log.warning("could not record the run's status in %s: %s", self.run_dir, exc.strerror)
            self.lock.release()
        result.step = self.step
        result.mlflow_run_id = self.tracker.run_id
        return result

    def train_step(self, batches: Iterator[dict[str, Any]], stop_requested: bool = False) -> StepStats:
        """One optimizer step: `accum_steps` micro-batches forward/backward, the gradient norm (and
        clipping), one reduction of the step's statistics across ranks, then, if every value is finite,
        the weight-decay schedule, optimizer, learning-rate schedule, EMA and the method's hook. A
        non-finite step changes no weights and does not advance `self.step`."""
        if self.players:
            return self.players_step(batches, stop_requested)
        cfg, engine = self.cfg, self.engine
        accum = cfg.optim.accum_steps
        started = time.perf_counter()
        self.model.train()
        loss_sum = torch.zeros((), device=engine.device)
        extras: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = _to_device(next(batches), engine.device)
            # Method randomness (e.g. MAE masks) is keyed by the micro-batch's place in the global
            # batch, so N ranks draw what one process with N-fold accumulation would draw.
            seed_step(cfg.run.seed, self.step, micro * self.world.world_size + self.world.rank)
            if self.device_transform is not None:
                batch = self.device_transform(batch)
            with engine.accumulate(self.model, micro == accum - 1), engine.autocast():
                out = self.model(batch)
                engine.backward(out["loss"] / accum)
            loss_sum += out["loss"].detach().float()
            for name, value in out.items():
                if name != "loss":
                    extras[name] = extras.get(name, 0) + value.detach().float()
        grad_norm = engine.clip_grad_norm(self.model, cfg.optim.grad_clip)
        # One host sync per step: the finiteness decision must be the same on every rank. The last
        # entry votes on a stop request (mean > 0: some rank was signalled), so every rank stops after
        # the same step. Riding on this reduction, it costs no extra collective.
        stop_vote = loss_sum.new_tensor(float(stop_requested))
        stats = torch.stack([loss_sum / accum, grad_norm.float(), *(v / accum for v in extras.values()), stop_vote])
        *reduced, stop_votes = all_reduce_mean(stats).tolist()
        loss, grad, *extra_values = reduced
        step = StepStats(
            loss=loss,
            grad_norm=grad,
            extras=dict(zip(extras, extra_values)),
            stop_requested=stop_votes > 0,
            applied=math.isfinite(loss) and math.isfinite(grad),
            lr=self.scheduler.get_last_lr()[0],
            batch=batch,
        )
        if not step.applied:
            engine.zero_grad(self.optimizer)
            return step
        self.weight_decay.apply(self.step)
        engine.optimizer_step(self.optimizer)
        return self._end_step(step, started)

    def _end_step(self, step: StepStats, started: float) -> StepStats:
        """After the step's updates: the schedule, the step count, the EMA and the method's hook."""
        total = self.cfg.train.steps
        self.scheduler.step()
        self.step += 1
        if self.ema_pairs:
            self.engine.ema_update(self.ema_pairs, self.method.ema_momentum(self.step, total))
        self.method.on_step_end(self.step, total)
        step.seconds = time.perf_counter() - started
        return step

    def players_step(self, batches: Iterator[dict[str, Any]], stop_requested: bool = False) -> StepStats:
        """One optimizer step of a method with players: the step's micro-batches are read once; each player due
        at this step (in the method's order) runs them forward and backward with its own loss, its gradients
        alone are kept, clipped with its own bound and applied. The step's statistics are the sum of the
        players' losses and, per player, `loss_<name>`, `grad_norm_<name>` and its method outputs.

        A non-finite player drops its update and the step is not applied; players that updated before it in
        this step keep their update (a GAN's alternation cannot be undone without a copy of the weights)."""
        cfg, engine = self.cfg, self.engine
        accum, world = cfg.optim.accum_steps, self.world
        started = time.perf_counter()
        self.model.train()
        micro_batches = [_to_device(next(batches), engine.device) for _ in range(accum)]
        extras: dict[str, float] = {}
        total_loss, applied, stop_votes = 0.0, True, 0.0
        lr = self.scheduler.get_last_lr()[0]
        for index, player in enumerate(self.players):
            if self.step % player.settings.every:
                continue
            loss_sum = torch.zeros((), device=engine.device)
            player_extras: dict[str, torch.Tensor] = {}
            for micro, batch in enumerate(micro_batches):
                # One draw stream per (player, micro-batch), the same at any world size: the global index.
                seed_step(cfg.run.seed, self.step, (index * accum + micro) * world.world_size + world.rank)
                if self.device_transform is not None:
                    batch = self.device_transform(batch)
                with engine.accumulate(self.model, micro == accum - 1), engine.autocast():
                    out = self.model(batch, player=player.name)
                    engine.backward(out["loss"] / accum)
                loss_sum += out["loss"].detach().float()
                for name, value in out.items():
                    if name != "loss":
                        player_extras[name] = player_extras.get(name, 0) + value.detach().float()
            for other, params in self._player_params.items():  # what reached the other players is dropped
                if other != player.name:
                    for param in params:
                        param.grad = None
            settings, _ = self.player_optims[player.name]
            grad_norm = engine.clip_grad_norm(self.model, settings.grad_clip)
            stats = [loss_sum / accum, grad_norm.float(), *(v / accum for v in player_extras.values())]
            stats.append(loss_sum.new_tensor(float(stop_requested)))
            loss, grad, *values, votes = all_reduce_mean(torch.stack(stats)).tolist()
            stop_votes = max(stop_votes, votes)
            total_loss += loss
            extras[f"loss_{player.name}"], extras[f"grad_norm_{player.name}"] = loss, grad
            extras.update({f"{name}_{player.name}": value for name, value in zip(player_extras, values)})
            if not (math.isfinite(loss) and math.isfinite(grad)):
                engine.zero_grad(self.optimizer)
                applied = False
                break
            self.weight_decay.apply(self.step)
            engine.optimizer_step(self.optimizer)
        step = StepStats(
            loss=total_loss,
            grad_norm=max((v for k, v in extras.items() if k.startswith("grad_norm_")), default=0.0),
            extras=extras,
            stop_requested=stop_votes > 0,
            applied=applied,
            lr=lr,
            batch=micro_batches[-1],
        )
        return self._end_step(step, started) if applied else step

    def _periodic(self, stats: StepStats, result: TrainResult) -> None:
        """What happens every so many steps: the log line and metrics, pictures, kNN, checkpoints."""
        train = self.cfg.train
        window = self._window
        for name, value in [("loss", stats.loss), ("grad_norm", stats.grad_norm), ("rank_step_time", stats.seconds)]:
            window.setdefault(name, []).append(value)
        for name, value in stats.extras.items():
            window.setdefault(name, []).append(value)
        if self.step % train.log_every == 0 or self.step == train.steps:
            self._report(stats.lr)
            self._window = {}
            result.checkpoint = self.checkpoints.poll() or result.checkpoint
        if train.vis_every and self.step % train.vis_every == 0:
            self._log_visuals(stats.batch)
        if train.knn_every and self.step % train.knn_every == 0:
            self._log_knn()
        if train.ckpt_every and self.step % train.ckpt_every == 0:
            result.checkpoint = self.save_checkpoint(background=train.async_checkpoint) or result.checkpoint
            self._last_saved = self.step

    def _record(self, metrics: dict[str, float]) -> None:
        """Every metric of this step goes to MLflow and, on rank 0, to metrics.jsonl, a local record that
        needs no server."""
        self.tracker.log_metrics(metrics, step=self.step)
        if self.metrics_log is not None:
            self.metrics_log.append(self.step, metrics)

    def _report(self, lr: float) -> None:
        """Log the window's means; per-rank figures expose stragglers and the most loaded rank."""
        progress = self._progress
        rates = progress.report(self.step)
        rates.update(self._flop_rates(rates["samples_per_sec"]))
        means = {name: sum(values) / len(values) for name, values in self._window.items()}
        per_rank = gather_floats(
            [
                means.pop("rank_step_time"),
                peak_memory_gb(self.engine.device),
                self.loader.skipped_total,
                getattr(self.loader, "skipped_shards_total", 0),
            ]
        )
        step_times = [r[0] for r in per_rank]
        metrics = {
            **means,
            "lr": lr,
            "samples_per_sec": rates["samples_per_sec"],
            **{name: rates[name] for name in ("tflops_per_device", "mfu") if name in rates},
            "step_time": rates["step_time"],
            "step_time_slowest_rank": max(step_times),
            "step_time_spread": (max(step_times) - min(step_times)) / max(1e-9, sum(step_times) / len(step_times)),
            "peak_memory_gb_max_rank": max(r[1] for r in per_rank),
            "data_skipped_samples": sum(r[2] for r in per_rank),
            "data_skipped_shards": sum(r[3] for r in per_rank),
        }
        if self.world.distributed:
            metrics.update({f"peak_memory_gb_rank{rank}": r[1] for rank, r in enumerate(per_rank)})
        self._record(metrics)
        if self.world.is_main:
            skipped = (metrics["data_skipped_samples"], metrics["data_skipped_shards"])
            log.info(progress.line(self.step, means["loss"], lr, rates, skipped))

    def _flop_rates(self, samples_per_sec: float) -> dict[str, float]:
        """Achieved model TFLOP/s per device (analytic training FLOPs, not counting recomputation) and
        MFU against the device's bf16 peak, when the method has a count and the peak is known."""
        if self.flops is None:
            return {}
        achieved = self.flops["train"] * samples_per_sec / self.world.world_size
        rates = {"tflops_per_device": achieved / 1e12}
        if self.peak_flops:
            rates["mfu"] = achieved / self.peak_flops
        return rates

    def _log_visuals(self, batch: dict[str, Any]) -> None:
        # Every rank runs the forward (a sharded model needs all of them); the tracker is rank 0's.
        self.method.eval()
        with torch.no_grad(), self.engine.autocast(), self.engine.full_parameters(self.model, self.method):
            pictures = self.method.visuals(batch)
        for name, image in pictures.items():
            self.tracker.log_image(image, name, self.step)

    def _log_knn(self) -> None:
        """kNN top-1 of the current encoder on eval.shards (every rank extracts: sharded encoders need all)."""
        cfg, started = self.cfg, time.perf_counter()
        shards = cfg.eval.shards or cfg.data.shards
        encoder = self.method.inference_network()
        self.method.eval()
        with self.engine.autocast(), self.engine.full_parameters(self.model, encoder):
            train_x, train_y, test_x, test_y = split_features(cfg, encoder, shards, self.engine.device)
        num_classes = count_classes(shards, train_y, test_y)
        top1 = knn_top1(train_x, train_y, test_x, test_y, num_classes, cfg.eval.k, cfg.eval.temperature)
        self._record({"knn_top1": top1})
        log.info("step %d: kNN top-1 %.2f%% (%.1fs)", self.step, 100 * top1, time.perf_counter() - started)

    def _score_test_split(self, result: TrainResult) -> None:
        """A classifier's top-1 on the test split of eval.shards (every rank scores: sharded networks need all),
        logged as test_top1 and, for a fine-tune, on its pretraining run as finetune_top1[_<fraction>pct]."""
        network = self.method.test_classifier()
        if network is None:
            return
        cfg, started = self.cfg, time.perf_counter()
        shards = cfg.eval.shards or cfg.data.shards
        self.method.eval()
        with self.engine.autocast(), self.engine.full_parameters(self.model, network):
            result.test_top1, result.test_images = classification_top1(cfg, network, shards, self.engine.device)
        self._record({"test_top1": result.test_top1})
        log.info(
            "step %d: test top-1 %.2f%% on %d images (%.1fs)",
            self.step,
            100 * result.test_top1,
            result.test_images,
            time.perf_counter() - started,
        )
        pre = self.pretraining
        if self.world.is_main and pre is not None and pre.run_id and cfg.tracking.enabled:
            fraction = cfg.data.label_fraction
            key = "finetune_top1" if fraction == 1 else f"finetune_top1_{percent_tag(fraction)}"
            uri = pre.tracking_uri or self.tracker.tracking_uri
            if log_metric_best_effort(uri, pre.run_id, key, result.test_top1, pre.step, cfg.tracking.close_timeout):
                log.info("tracking: %s logged on the pretraining run %s", key, pre.run_id)

    def _stop_nonfinite(self, loss: float, grad: float, before: tuple | None, result: TrainResult) -> None:
        """Checkpoint the state before the offending step (weights were not updated) and stop."""
        rank_state = self._rank_state(*before) if before is not None else None
        result.checkpoint = self.save_checkpoint(rank_state)
        raise NonFiniteLossError(
            f"non-finite training signal at step {self.step + 1} (loss={loss}, grad_norm={grad}); "
            f"the last good state is checkpointed at {result.checkpoint}. "
            "Lower optim.base_lr, raise optim.warmup_steps or enable optim.grad_clip, then resume; "
            "or set train.on_nonfinite=skip to drop such steps."
        )


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).fit()
