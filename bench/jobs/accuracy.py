"""The accuracy job: top-1 / top-5 of a (patched) model over an eval set, with per-image predictions.

Weights, in order: a finetune job's checkpoint when the spec names a finetune recipe (the job then
depends on that finetune job), a `--checkpoint` file, timm's pretrained weights, the embedded model's
committed weights, or, only when the user asked for it with `--random-weights`, none at all
(`bench.models.weights_of` decides; pre-flight refuses the rest).
"""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import methods

from .. import data, models
from ..records import atomic_write_bytes, preds_path
from ..spec import EMBEDDED_DATA, JobSpec
from . import JobContext, JobKind, ReportPart, register

TOPK = 5


@torch.inference_mode()
def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: str = "cpu",
             dtype: str = "fp32", progress: bool = True, workers: int = 0) -> dict:
    """Top-1 / top-5 (percent) over `dataset` in its order; `labels` (N,) and `top5` (N, 5) int64
    predicted class ids, best first (-1 pads models with fewer than 5 classes); `calibration`: per-image
    float32 arrays of the softmax (`calibration_arrays`)."""
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    labels, top5, calibration = [], [], []
    bar = tqdm(loader, desc="eval", unit="batch", disable=None if progress else True, leave=False)
    for images, targets in bar:
        with models.autocast(device, dtype):
            logits = model(images.to(device, non_blocking=True))
        k = min(TOPK, logits.shape[-1])
        top5.append(logits.float().topk(k, dim=-1).indices.cpu())
        labels.append(targets.to(torch.int64))
        calibration.append(calibration_arrays(logits, labels[-1].to(logits.device)))
    labels = torch.cat(labels).numpy()
    top5 = torch.cat(top5).numpy()
    calibration = {name: np.concatenate([c[name] for c in calibration]) for name in CALIBRATION_ARRAYS}
    readable = labels != data.UNREADABLE  # images the data set could not decode (skip_unreadable) drop out
    labels, top5, unreadable = labels[readable], top5[readable], np.flatnonzero(~readable).tolist()
    calibration = {name: values[readable] for name, values in calibration.items()}
    if not labels.size:
        raise data.DataError(f"no readable image among the {len(unreadable)} of the eval set")
    if top5.shape[1] < TOPK:
        top5 = np.pad(top5, ((0, 0), (0, TOPK - top5.shape[1])), constant_values=-1)
    return dict(
        top1=100.0 * float(np.mean(top5[:, 0] == labels)),
        top5=100.0 * float(np.mean((top5 == labels[:, None]).any(axis=1))),
        n_images=int(len(labels)),
        labels=labels.astype(np.int64),
        top5_ids=top5.astype(np.int64),
        unreadable=unreadable,  # positions in the data set's order
        calibration=calibration,
    )


# Per-image calibration inputs kept in the predictions file instead of all class probabilities (ImageNet
# has 1000 per image): ECE needs the confidence, the Brier score its per-image term, and the probability
# of the true class is kept for other scores (log loss) that need no more.
CALIBRATION_ARRAYS = ("confidence", "p_true", "brier")


def calibration_arrays(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """(B,) float32 arrays of one batch: the max softmax probability, the probability of the true class
    and the Brier term sum_c (p_c - y_c)^2 = sum_c p_c^2 - 2 p_y + 1 (y one-hot). Unreadable images
    (label -1) get values of class 0 here and are dropped with their rows."""
    probs = torch.softmax(logits.float(), dim=-1)
    p_true = probs.gather(1, targets.clamp_min(0).view(-1, 1)).squeeze(1)
    brier = (probs * probs).sum(-1) - 2.0 * p_true + 1.0
    return dict(confidence=probs.max(-1).values.cpu().numpy(), p_true=p_true.cpu().numpy(),
                brier=brier.clamp_min(0.0).cpu().numpy())


def patched_model(spec: JobSpec, context: JobContext) -> torch.nn.Module:
    """The model with its weights and the method applied: what the job evaluates."""
    models.seed_everything(spec.seed)
    if spec.finetune:  # the finetune job saved the whole patched model (predictors included)
        model = models.create_model(spec.model)
        methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
        weights = context.run_dir / context.record_of("finetune").metrics["checkpoint"]
        models.load_weights(model, models.read_checkpoint(weights), weights, convert=False)
        return model
    pretrained = models.wants_pretrained(spec.model, spec.checkpoint, spec.pretrained, spec.random_weights)
    model = models.create_model(spec.model, spec.checkpoint, pretrained)
    return methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())


def run(spec: JobSpec, context: JobContext) -> dict:
    """Build, patch, evaluate; write `<key>.preds.npz`; return the record's metrics."""
    model = patched_model(spec, context)
    dataset = data.eval_dataset(spec.data, model, spec.limit, skip_unreadable=bool(dict(spec.extra).get("skip_unreadable")))
    check_classes(len(dataset.classes), getattr(model, "num_classes", 0), spec)
    extra = dict(spec.extra)
    workers = int(extra.get("workers", 0 if spec.data == EMBEDDED_DATA else min(8, os.cpu_count() or 1)))
    result = evaluate(model, dataset, spec.batch_size, spec.device, spec.dtype,
                      progress=sys.stderr.isatty(), workers=workers)
    path = preds_path(context.run_dir, spec.key)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=result["labels"], top5=result["top5_ids"],
                        **{name: values.astype(np.float32) for name, values in result["calibration"].items()})
    atomic_write_bytes(path, buffer.getvalue())
    return dict(
        top1=result["top1"], top5=result["top5"], n_images=result["n_images"], preds_file=path.name,
        tokens_per_block=list(model.token_reduction.schedule().tokens_attn),
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in dataset.data_config.items()},
        data_source=dataset.source, weights=models.weights_of(spec), regime=spec.regime,
        method_notes=list(model.token_reduction.describe().get("notes", [])),
        skipped_images=len(result["unreadable"]), skipped_files=[dataset.file_of(i) for i in result["unreadable"]],
    )


def check_classes(data_classes: int, head_classes: int, spec: JobSpec) -> None:
    """Label i of the data must mean output i of the head: equal counts at least. A folder with a subset
    of ImageNet's classes would number them 0..k-1 and be scored against the wrong outputs."""
    if data_classes != head_classes:
        raise data.DataError(f"data {spec.data!r} has {data_classes} classes but model {spec.model!r} "
                             f"predicts {head_classes}; valid: data with exactly the classes the model was "
                             "trained on, in the same order")


def validate(spec: JobSpec) -> None:
    """Pre-flight: trained weights (or an explicit opt-out), readable data whose classes fit the head."""
    models.check_weights(spec)
    data.check_data(spec.data)
    if spec.data == EMBEDDED_DATA:
        data_classes = len(data.FASHION_MNIST_CLASSES)
    else:
        data_classes = sum(1 for entry in data.check_folder(spec.data).iterdir() if entry.is_dir())
    check_classes(data_classes, models.skeleton(spec.model).num_classes, spec)


KIND = register(JobKind(
    name="acc", run=run,
    key_fields=("checkpoint", "pretrained", "random_weights", "data", "limit", "batch_size", "device",
                "dtype", "seed", "finetune", "extra"),  # extra: skip_unreadable, only when given
    report=ReportPart(renames=dict(dtype="acc_dtype", device="acc_device"),
                      conditions=("data", "limit", "acc_dtype", "acc_device"),
                      values=("top1", "top5", "n_images", "preds_path", "weights")),
    depends_on=("finetune",), validate=validate,
))
