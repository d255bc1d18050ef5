"""The accuracy job: top-1 / top-5 of a (patched) model over an eval set, with per-image predictions.

Weights: a `--checkpoint` file, else timm's pretrained weights when asked. The embedded model always
loads its committed weights when no checkpoint is given (`models.wants_pretrained`), since it means
nothing untrained; any other model without either is evaluated at random init, as asked.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import methods

from .data import DataError, eval_dataset
from .models import autocast, create_model, seed_everything, wants_pretrained
from .records import atomic_write_bytes, preds_path
from .spec import EMBEDDED_DATA, JobSpec

TOPK = 5


@torch.inference_mode()
def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: str = "cpu",
             dtype: str = "fp32", progress: bool = True, workers: int = 0) -> dict:
    """Top-1 / top-5 (percent) over `dataset` in its order; `labels` (N,) and `top5` (N, 5) int64
    predicted class ids, best first (-1 pads models with fewer than 5 classes)."""
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    labels, top5 = [], []
    bar = tqdm(loader, desc="eval", unit="batch", disable=None if progress else True, leave=False)
    for images, targets in bar:
        with autocast(device, dtype):
            logits = model(images.to(device, non_blocking=True))
        k = min(TOPK, logits.shape[-1])
        top5.append(logits.float().topk(k, dim=-1).indices.cpu())
        labels.append(targets.to(torch.int64))
    labels = torch.cat(labels).numpy()
    top5 = torch.cat(top5).numpy()
    if top5.shape[1] < TOPK:
        top5 = np.pad(top5, ((0, 0), (0, TOPK - top5.shape[1])), constant_values=-1)
    return dict(
        top1=100.0 * float(np.mean(top5[:, 0] == labels)),
        top5=100.0 * float(np.mean((top5 == labels[:, None]).any(axis=1))),
        n_images=int(len(labels)),
        labels=labels.astype(np.int64),
        top5_ids=top5.astype(np.int64),
    )


def run(spec: JobSpec, run_dir: Path) -> dict:
    """Build, patch, evaluate; write `<key>.preds.npz`; return the record's metrics."""
    seed_everything(spec.seed)
    pretrained = wants_pretrained(spec.model, spec.checkpoint, spec.pretrained)
    model = create_model(spec.model, spec.checkpoint, pretrained)
    dataset = eval_dataset(spec.data, model, spec.limit)
    _check_label_range(dataset, model, spec)
    methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
    extra = dict(spec.extra)
    workers = int(extra.get("workers", 0 if spec.data == EMBEDDED_DATA else min(8, os.cpu_count() or 1)))
    result = evaluate(model, dataset, spec.batch_size, spec.device, spec.dtype,
                      progress=sys.stderr.isatty(), workers=workers)
    path = preds_path(run_dir, spec.key)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=result["labels"], top5=result["top5_ids"])
    atomic_write_bytes(path, buffer.getvalue())  # temp file in the folder + os.replace
    return dict(
        top1=result["top1"], top5=result["top5"], n_images=result["n_images"], preds_file=path.name,
        tokens_per_block=list(model.token_reduction.schedule().tokens_attn),
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in dataset.data_config.items()},
        data_source=dataset.source, weights=_weights(spec),
    )


def _check_label_range(dataset, model, spec: JobSpec) -> None:
    num_classes = getattr(model, "num_classes", None)
    if num_classes and dataset.targets and max(dataset.targets) >= num_classes:
        raise DataError(f"data {spec.data!r} has {len(dataset.classes)} classes but model {spec.model!r} "
                        f"predicts {num_classes}; valid: data whose classes the model was trained on")


def _weights(spec: JobSpec) -> str:
    if spec.checkpoint is not None:
        return f"checkpoint:{spec.checkpoint}"
    return "pretrained" if wants_pretrained(spec.model, spec.checkpoint, spec.pretrained) else "random-init"
