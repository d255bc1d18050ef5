"""The trace job: what a method decided, image by image, so that two methods can be compared decision
by decision (bench/report/agreement.py, docs/protocol.md#decision-agreement).

For one configuration it runs the patched model with tracing on over the first images of the eval set
and writes `<key>.trace.npz` beside the record:

    labels      (n,) int64     the true classes, to check that two traces are of the same images
    pred        (n,) int64     the top-1 class
    features    (n, D) float16 the final CLS pre-logit features (the input of the classifier head)
    state_<b>   (n, N0) int8   methods.KEPT/IDLE/DROPPED/FUSED per original patch after block b
    group_<b>   (n, N0) int16  merging methods: the output token holding each patch (-1 - p: dropped)
    state_blocks, group_blocks (k,) int64: the blocks b that recorded each; depth, num_patches: scalars

About 200 bytes per image for the embedded model, 6 kB for DeiT-S (196 patches, 12 blocks), which is
why only the first `images` images (default 1000) are traced: agreement needs images in hundreds, not
the whole eval set. Not a default metric: `--metrics trace` asks for it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import data, models
from ..records import atomic_write_bytes, records_dir
from ..spec import EMBEDDED_DATA, JobSpec, pairs
from . import JobContext, JobKind, register
from .accuracy import check_classes, patched_model
from .accuracy import validate as validate_accuracy

DEFAULT_IMAGES = 1000


class TraceError(ValueError):
    """A trace knob or a method's auxiliary outputs that cannot be stored."""


def trace_path(run_dir, key: str):
    return records_dir(run_dir) / f"{key}.trace.npz"


@torch.inference_mode()
def trace(model: torch.nn.Module, dataset, batch_size: int, device: str = "cpu", dtype: str = "fp32",
          workers: int = 0) -> dict:
    """The arrays of a trace file (module docstring) of `model`, patched by `methods.apply`, on `dataset`."""
    model.eval().to(device)
    method = model.token_reduction
    features, labels, preds = [], [], []
    states: dict[int, list] = {}
    groups: dict[int, list] = {}
    # The classifier's input is the pre-logit feature whatever the model's pooling (CLS, fc_norm, distilled:
    # the CLS head only; Swin: its head module pools, then `fc` classifies), and a hook reads it without
    # knowing how the method patched the forward.
    classifier = getattr(model.head, "fc", model.head)
    hook = classifier.register_forward_hook(lambda module, args, out: features.append(args[0].float().cpu()))
    method.state.trace = True
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
            with models.autocast(device, dtype):
                logits = model(images.to(device))
            preds.append(logits.argmax(-1).cpu())
            labels.append(targets.to(torch.int64))
            _collect(method.aux, "patch_state", states, len(preds))
            _collect(method.aux, "patch_group", groups, len(preds))
    finally:  # the model may be reused (tests, pictures): leave it as it was
        hook.remove()
        method.state.trace = False
    if len(features) != len(preds):
        raise TraceError(f"the classifier head ran {len(features)} times in {len(preds)} batches")
    arrays = dict(labels=torch.cat(labels).numpy(), pred=torch.cat(preds).numpy().astype(np.int64),
                  features=torch.cat(features).numpy().astype(np.float16),
                  depth=np.int64(method.geometry.depth), num_patches=np.int64(method.geometry.num_patches),
                  state_blocks=np.array(sorted(states), dtype=np.int64),
                  group_blocks=np.array(sorted(groups), dtype=np.int64))
    for block, parts in states.items():
        arrays[f"state_{block}"] = torch.cat(parts).numpy().astype(np.int8)
    for block, parts in groups.items():
        arrays[f"group_{block}"] = _small_ints(torch.cat(parts).numpy())
    return arrays


def _collect(aux: dict, kind: str, into: dict[int, list], batches: int) -> None:
    """Append this batch's record of every block; a block must record in every batch or in none, or
    its rows would not line up with the images."""
    recorded = aux.get(kind, {})
    if batches > 1 and set(recorded) != set(into):
        raise TraceError(f"{kind}: blocks {sorted(recorded)} recorded in batch {batches}, {sorted(into)} before")
    for block, value in recorded.items():
        into.setdefault(int(block), []).append(value.detach().cpu())


def _small_ints(values: np.ndarray) -> np.ndarray:
    """int16 when every value fits (token ids and -1 - patch index: any ViT up to 32k patches)."""
    info = np.iinfo(np.int16)
    fits = values.size == 0 or (values.min() >= info.min and values.max() <= info.max)
    return values.astype(np.int16 if fits else np.int32)


def run(spec: JobSpec, context: JobContext) -> dict:
    """Build and patch as the accuracy job does (same weights, finetuned ones included), trace, write."""
    model = patched_model(spec, context)
    dataset = data.eval_dataset(spec.data, model, images_of(spec))
    check_classes(len(dataset.classes), getattr(model, "num_classes", 0), spec)
    workers = 0 if spec.data == EMBEDDED_DATA else min(8, os.cpu_count() or 1)  # as the accuracy job decodes
    arrays = trace(model, dataset, spec.batch_size, spec.device, spec.dtype, workers)
    path = trace_path(context.run_dir, spec.key)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return dict(
        trace_file=path.name, n_images=int(len(arrays["labels"])), trace_bytes=len(buffer.getvalue()),
        top1=100.0 * float(np.mean(arrays["pred"] == arrays["labels"])),
        state_blocks=arrays["state_blocks"].tolist(), group_blocks=arrays["group_blocks"].tolist(),
        feature_dim=int(arrays["features"].shape[1]), weights=models.weights_of(spec), regime=spec.regime,
    )


def images_of(spec: JobSpec) -> int:
    """How many images a trace job traces: the first `images` (default 1000), within `--limit`."""
    images = dict(spec.extra).get("images", DEFAULT_IMAGES)
    return images if spec.limit is None else min(spec.limit, images)


@dataclass(frozen=True)
class TraceKind(JobKind):
    """A JobKind that checks its one knob and leaves it out of the key at its default, so that asking
    for 1000 images explicitly is the same job as not asking. `limit` stays the user's, not the count
    traced: a finetuned configuration's trace then depends on the same finetune job as its accuracy."""

    def normalise(self, spec: JobSpec) -> JobSpec:
        spec = super().normalise(spec)
        extra = dict(spec.extra)
        images = extra.get("images", DEFAULT_IMAGES)
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise TraceError(f"trace images {images!r} is not valid; valid: an integer >= 1")
        if images == DEFAULT_IMAGES:
            extra.pop("images", None)
        return replace(spec, extra=pairs(extra))


KIND = register(TraceKind(
    name="trace", run=run,
    key_fields=("checkpoint", "pretrained", "random_weights", "data", "limit", "batch_size", "device",
                "dtype", "seed", "finetune", "extra"),  # extra: images, only when not the default
    # No summary columns: a trace is read pair by pair by the agreement part of the report.
    depends_on=("finetune",), validate=validate_accuracy, default=False,
))
