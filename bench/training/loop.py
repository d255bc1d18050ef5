"""The finetune loop: timm's optimizer, scheduler and EMA, DDP, gradient accumulation, AMP, and
checkpoints a requeued or interrupted job resumes from with identical state.

One step is one optimizer update over `accum_steps` batches of the global batch size. A checkpoint
(`last.pt` in the job's checkpoint folder, written atomically by process 0) holds the model, optimizer,
scheduler, AMP scaler, EMA, the number of batches done, the curve so far and every RNG state; the data
order is a function of (seed, epoch, batch) (bench/training/data.py), so a resumed job continues with
exactly the batches and random draws an uninterrupted one would have used.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from ..models import autocast
from .distributed import Processes
from .objective import loss_terms


class StudentForward(nn.Module):
    """What DDP wraps: one forward giving the student's final tokens and logits, so that gradient
    synchronisation sees every call (DDP hooks `forward` only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final normed tokens, pre-logit features, logits)."""
        features = self.model.forward_features(images)
        return features, self.model.forward_head(features, pre_logits=True), self.model.forward_head(features)


@dataclass
class Progress:
    batches_done: int = 0
    curve: list = field(default_factory=list)  # one entry per finished epoch
    resumed_at: list = field(default_factory=list)  # batches done when a run picked up a checkpoint
    epoch_terms: dict = field(default_factory=dict)  # running sums of the current epoch's loss terms
    epoch_batches: int = 0
    epoch_seconds: float = 0.0


def param_groups(model: nn.Module, recipe: dict) -> list[dict]:
    """The method's own modules at the full lr, the backbone at `backbone_lr_scale`; no weight decay on
    biases, norms and the model's `no_weight_decay` parameters; `freeze` left out entirely."""
    method = model.token_reduction
    own = {f"{name}." for name in method.trainable_modules()}
    for name, parameter in model.named_parameters():
        if name in recipe["freeze"]:
            parameter.requires_grad_(False)
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = []
    for is_own, scale in ((True, 1.0), (False, recipe["backbone_lr_scale"])):
        part = _Subset({n: p for n, p in model.named_parameters()
                        if p.requires_grad and any(n.startswith(o) for o in own) == is_own})
        for group in param_groups_weight_decay(part, recipe["weight_decay"], skip):
            if group["params"]:
                groups.append(dict(group, lr_scale=scale, backbone=not is_own))
    return groups


class _Subset(nn.Module):
    """A named subset of a model's parameters, for timm's weight-decay grouping."""

    def __init__(self, named: dict):
        super().__init__()
        self._named = named

    def named_parameters(self, *args, **kwargs):
        return iter(self._named.items())


class Trainer:
    def __init__(self, student: nn.Module, teacher: nn.Module | None, train_set, recipe: dict, device: str,
                 dtype: str, processes: Processes, checkpoint_dir: Path, evaluate=None, progress: bool = True):
        self.student, self.teacher, self.train_set, self.recipe = student, teacher, train_set, recipe
        self.device, self.dtype, self.processes = device, dtype, processes
        self.checkpoint_dir, self.evaluate, self.show = Path(checkpoint_dir), evaluate, progress
        self.method = student.token_reduction
        self.base_keep_ratio = self.method.keep_ratio
        self.steps_per_epoch = train_set.steps_per_epoch(recipe["batch_size"])
        self.total_batches = max(recipe["accum_steps"], round(recipe["epochs"] * self.steps_per_epoch))
        self.total_updates = self.total_batches // recipe["accum_steps"]
        self.optimizer = create_optimizer_v2(param_groups(student, recipe), opt=recipe["opt"], lr=recipe["lr"],
                                             weight_decay=recipe["weight_decay"])
        warmup = round(recipe["warmup_epochs"] * self.steps_per_epoch / recipe["accum_steps"])
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=self.total_updates, lr_min=recipe["min_lr"],
                                           warmup_t=min(warmup, self.total_updates - 1), warmup_lr_init=recipe["min_lr"],
                                           t_in_epochs=False)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16" and device.startswith("cuda"))
        self.ema = ModelEmaV3(student, decay=recipe["ema_decay"]) if recipe["ema_decay"] > 0 else None
        self.mixup = None
        if recipe["mixup"] > 0 or recipe["cutmix"] > 0:
            self.mixup = Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"],
                               label_smoothing=recipe["label_smoothing"], num_classes=train_set.num_classes)
        self.forward = StudentForward(student)
        if processes.world > 1:
            self.forward = nn.parallel.DistributedDataParallel(self.forward)
        self.state = Progress()

    # --- checkpoints ----------------------------------------------------------------------------------
    @property
    def last(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    def save(self) -> None:
        if self.processes.rank != 0:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = dict(
            model=self.student.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None, progress=vars(self.state),
            rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
        )
        temporary = self.last.with_name(f".last.pt.{os.getpid()}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.last)

    def resume(self) -> bool:
        """Pick up `last.pt` if there is one: every state as it was saved."""
        if not self.last.exists():
            return False
        state = torch.load(self.last, map_location=self.device, weights_only=False)
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.state = Progress(**state["progress"])
        self.state.resumed_at.append(self.state.batches_done)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return True

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self) -> Progress:
        self.resume()
        recipe, batch_size = self.recipe, self.recipe["batch_size"]
        part = slice(self.processes.rank, None, self.processes.world)  # this process's share of a global batch
        bar = tqdm(total=self.total_batches, initial=self.state.batches_done, desc="finetune", unit="batch",
                   disable=None if self.show and self.processes.rank == 0 else True, leave=False)
        self.student.train()
        while self.state.batches_done < self.total_batches:
            epoch, start = divmod(self.state.batches_done, self.steps_per_epoch)
            started = time.perf_counter()
            for images, labels in self.train_set.batches(epoch, start, batch_size, part):
                self._batch(images.to(self.device), labels.to(self.device))
                bar.update(1)
                bar.set_postfix(loss=f"{self.state.epoch_terms.get('total', 0) / max(self.state.epoch_batches, 1):.3f}",
                                img_s=f"{batch_size * bar.n / max(bar.format_dict['elapsed'], 1e-9):.0f}")
                if self.state.batches_done >= self.total_batches:
                    break
                if self._update_boundary() and recipe["checkpoint_every"] and \
                        (self.state.batches_done // recipe["accum_steps"]) % recipe["checkpoint_every"] == 0:
                    self.state.epoch_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save()
            self.state.epoch_seconds += time.perf_counter() - started
            if self.state.batches_done % self.steps_per_epoch == 0 or self.state.batches_done >= self.total_batches:
                self._end_epoch(epoch)
                self.save()
        bar.close()
        self.method.keep_ratio = self.base_keep_ratio
        return self.state

    def _update_boundary(self) -> bool:
        return self.state.batches_done % self.recipe["accum_steps"] == 0

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        recipe, update = self.recipe, self.state.batches_done // self.recipe["accum_steps"]
        self._schedule(update)
        targets = labels
        if self.mixup is not None:
            np.random.seed(self.state.batches_done)  # the mix of batch b is the same after any resume
            random.seed(self.state.batches_done)
            images, targets = self.mixup(images, labels)
        last_of_update = (self.state.batches_done + 1) % recipe["accum_steps"] == 0
        sync = self.forward.no_sync() if (self.processes.world > 1 and not last_of_update) else nullcontext()
        with sync, autocast(self.device, self.dtype):
            total, terms = loss_terms(self.forward, self.teacher, self.method, images, targets, recipe)
        self.scaler.scale(total / recipe["accum_steps"]).backward()
        if last_of_update:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.student, step=update)
        self.state.batches_done += 1
        self.state.epoch_batches += 1
        for name, value in dict(terms, total=float(total.detach())).items():
            self.state.epoch_terms[name] = self.state.epoch_terms.get(name, 0.0) + value

    def _schedule(self, update: int) -> None:
        """The lr of this update; the predictor-only phase; the keep-rate warm-up."""
        self.scheduler.step_update(update)
        frozen = update < self.recipe["predictor_only_fraction"] * self.total_updates
        for group in self.optimizer.param_groups:
            if group.get("backbone") and frozen:
                group["lr"] = 0.0  # the backbone waits while the method's own modules learn (DynamicViT)
        warmup = self.recipe["keep_warmup_epochs"] * self.steps_per_epoch / self.recipe["accum_steps"]
        if warmup > 0:
            t = min(update / warmup, 1.0)
            base = self.base_keep_ratio
            self.method.keep_ratio = base + (1 - base) * (math.cos(math.pi * t) + 1) / 2

    def _end_epoch(self, epoch: int) -> None:
        n = max(self.state.epoch_batches, 1)
        entry = dict(epoch=epoch + 1, batches=self.state.batches_done,
                     loss={name: value / n for name, value in self.state.epoch_terms.items()},
                     lr=max(group["lr"] for group in self.optimizer.param_groups),
                     seconds=self.state.epoch_seconds,
                     img_s=self.state.epoch_batches * self.recipe["batch_size"] / max(self.state.epoch_seconds, 1e-9))
        if self.evaluate is not None and self.processes.rank == 0:
            entry["top1"] = self.evaluate(self.result_model())
            self.student.train()
        self.state.curve.append(entry)
        self.state.epoch_terms, self.state.epoch_batches, self.state.epoch_seconds = {}, 0, 0.0

    def result_model(self) -> nn.Module:
        """The weights the job reports: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.student
