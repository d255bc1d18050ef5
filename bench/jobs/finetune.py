"""The finetune job: the method-patched model (student) trained from the model's weights with its
method's recipe, the unpatched model as teacher; accuracy jobs of that configuration evaluate its result.

An accuracy job whose spec names a finetune recipe depends on this job (`upstream_of`): the plan puts
this one first, inline and local dispatch run it first, SLURM starts the accuracy job `afterok`. FLOPs
and throughput do not depend on weights and never wait for it. The job is checkpointable: requeued after a
timeout or preemption, it resumes from its last checkpoint (bench/training/loop.py) and its record lists
where it resumed. Its record holds the whole recipe and the curve (loss terms and top-1 per epoch).
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace

import methods

from .. import data, models
from ..records import atomic_write_bytes
from ..spec import JobSpec
from ..training import distributed
from ..training.data import TrainSet
from ..training.loop import Trainer
from ..training.recipe import EMBEDDED_TRAIN, RecipeError, resolve
from . import JobContext, JobKind, ReportPart, register
from .accuracy import evaluate

CHECKPOINTS = "checkpoints"  # <run>/checkpoints/<key>/last.pt while training, <key>.safetensors at the end


def run(spec: JobSpec, context: JobContext) -> dict:
    recipe = resolve(spec.method, dict(spec.finetune))
    processes, device = distributed.setup(spec.device)
    try:
        models.seed_everything(spec.seed)
        teacher = models.create_model(spec.model, spec.checkpoint,
                                      models.wants_pretrained(spec.model, spec.checkpoint, spec.pretrained,
                                                              spec.random_weights))
        student = methods.apply(copy.deepcopy(teacher), spec.method, spec.keep_ratio, spec.layers, **spec.options())
        student.to(device)
        teacher = teacher.to(device).eval().requires_grad_(False) if recipe["distill"] != "none" else None
        train_set = TrainSet(recipe["train_data"], student, spec.seed, recipe["train_limit"], recipe["workers"])
        _check_classes(train_set.num_classes, student, spec, recipe)
        eval_set = data.eval_dataset(spec.data, student, spec.limit)

        def top1(model) -> float:
            return evaluate(model, eval_set, batch_size=256, device=device, dtype=spec.dtype, progress=False)["top1"]

        trainer = Trainer(student, teacher, train_set, recipe, device, spec.dtype, processes,
                          context.run_dir / CHECKPOINTS / spec.key, evaluate=top1)
        progress = trainer.run()
        if processes.rank != 0:
            return {}
        weights = context.run_dir / CHECKPOINTS / f"{spec.key}.safetensors"
        _save_weights(trainer.result_model(), weights)
    finally:
        distributed.teardown()
    return dict(
        checkpoint=str(weights.relative_to(context.run_dir)), recipe=recipe, curve=progress.curve,
        top1=progress.curve[-1].get("top1") if progress.curve else None,
        batches=progress.batches_done, updates=trainer.total_updates, train_images=len(train_set),
        processes=processes.world, resumed_at=progress.resumed_at,
        slurm_restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        seconds_per_epoch=[entry["seconds"] for entry in progress.curve],
    )


def _save_weights(model, path) -> None:
    from safetensors.torch import save

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


def _check_classes(train_classes: int, model, spec: JobSpec, recipe: dict) -> None:
    if train_classes != model.num_classes:
        raise data.DataError(f"training data {recipe['train_data']!r} has {train_classes} classes but model "
                             f"{spec.model!r} predicts {model.num_classes}; valid: data with the model's classes")


def upstream_of(spec: JobSpec) -> JobSpec | None:
    """The finetune job an accuracy job of a finetuned configuration needs."""
    return replace(spec, kind="finetune") if spec.finetune else None


def validate(spec: JobSpec) -> None:
    """Pre-flight: the recipe resolves for this method, the starting weights are trained (or explicitly
    random), the training data can be read."""
    try:
        recipe = resolve(spec.method, dict(spec.finetune))
    except (RecipeError, methods.MethodError) as exc:
        raise RecipeError(f"{exc} (method {spec.method})") from None
    models.check_weights(replace(spec, finetune=()))
    if recipe["train_data"] != EMBEDDED_TRAIN:
        data.check_folder(recipe["train_data"])


KIND = register(JobKind(
    name="finetune", run=run,
    key_fields=("checkpoint", "pretrained", "random_weights", "data", "limit", "device", "dtype", "seed", "finetune"),
    report=ReportPart(values=("top1", "curve", "recipe")),
    upstream_of=upstream_of, measures=False, checkpointable=True, data_parallel=True, validate=validate,
))
