"""Job specs: one measurement of one configuration, frozen, JSON-serialisable, keyed by content hash."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

METRICS = ("acc", "flops", "throughput")
DTYPES = ("fp32", "bf16", "fp16")
EMBEDDED_DATA = "fashion-mnist"  # the default eval set; anything else is an ImageNet-style folder


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines one measurement. Two equal specs give the same key and record."""

    metric: str  # one of METRICS
    model: str  # timm model name
    method: str = "none"  # canonical method name (methods.canonical_name)
    keep_ratio: float = 1.0
    layers: tuple[int, ...] | None = None  # None: the method's default layers
    method_options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs, as the user gave them
    checkpoint: str | None = None  # absolute path of a local checkpoint file
    pretrained: bool = False  # timm's own pretrained weights (download or cache)
    data: str = EMBEDDED_DATA  # EMBEDDED_DATA or an absolute ImageNet-style folder (acc only)
    limit: int | None = None  # first N eval images (acc only)
    batch_size: int = 128
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    finetune_epochs: int = 0  # 0 = off-the-shelf
    extra: tuple[tuple[str, Any], ...] = field(default=())  # measurement knobs (e.g. throughput repeats)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["method_options"] = {k: v for k, v in self.method_options}
        d["extra"] = {k: v for k, v in self.extra}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown spec field(s) {sorted(unknown)}")
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(int(i) for i in d["layers"])
        d["method_options"] = tuple(sorted((d.get("method_options") or {}).items()))
        d["extra"] = tuple(sorted((d.get("extra") or {}).items()))
        return cls(**d)

    @property
    def key(self) -> str:
        """Stable content hash: metric-model-method-ratio prefix for humans, sha1 for identity."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha1(canon.encode()).hexdigest()[:12]
        return f"{self.metric}-{self.method}-{self.keep_ratio:g}-{digest}"

    def options(self) -> dict:
        return dict(self.method_options)

    def baseline(self) -> "JobSpec":
        """The unpatched counterpart measured under the same conditions."""
        return replace(self, method="none", keep_ratio=1.0, layers=None, method_options=())


# ---------------------------------------------------------------------------------------------
# Grids: the cross product a run asks for, and its file in the run folder.

GRID_FILE = "grid.json"
GRID_SCHEMA = 1


class GridError(ValueError):
    """A run folder without a usable grid.json."""


@dataclass(frozen=True)
class Variant:
    """One method configuration of a grid; every keep ratio is measured for it."""

    method: str  # canonical name
    layers: tuple[int, ...] | None = None
    options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs the user set


def expand_grid(models: Sequence[str], variants: Sequence[Variant], ratios: Sequence[float],
                metrics: Sequence[str], throughput_batch_sizes: Sequence[int] = (1,),
                extra: dict[str, dict] | None = None, **common) -> list[JobSpec]:
    """JobSpecs of a grid: per model x metric the unpatched baseline once (ratio 1.0), then every
    variant x ratio (a method at ratio 1.0 is still its own row). Throughput gets one job per batch
    size. `extra` maps a metric to its measurement knobs (JobSpec.extra); `common` sets the other
    JobSpec fields (device, dtype, batch_size, data, limit, ...)."""
    specs: dict[str, JobSpec] = {}
    for model in models:
        for metric in metrics:
            sizes = throughput_batch_sizes if metric == "throughput" else (common.get("batch_size", 128),)
            knobs = tuple(sorted((extra or {}).get(metric, {}).items()))
            for batch_size in sizes:
                base = _for_metric(JobSpec(metric=metric, model=model, extra=knobs,
                                           **dict(common, batch_size=batch_size)))
                specs.setdefault(base.key, base)
                for variant in variants:
                    if variant.method == "none":
                        continue  # the baseline row above
                    for ratio in ratios:
                        spec = replace(base, method=variant.method, keep_ratio=float(ratio),
                                       layers=variant.layers, method_options=variant.options)
                        specs.setdefault(spec.key, spec)
    return list(specs.values())


def _for_metric(spec: JobSpec) -> JobSpec:
    """Clear the fields a metric does not read, so changing them does not invalidate its records."""
    if spec.metric == "flops":  # counted for one image, from the architecture alone
        return replace(spec, batch_size=1, limit=None, data=EMBEDDED_DATA)
    if spec.metric == "throughput":  # synthetic input
        return replace(spec, limit=None, data=EMBEDDED_DATA)
    return spec


def save_grid(run_dir, specs: Sequence[JobSpec]) -> Path:
    from .records import atomic_write_json  # records imports this module

    path = Path(run_dir) / GRID_FILE
    atomic_write_json(path, dict(schema=GRID_SCHEMA, specs=[s.to_dict() for s in specs]))
    return path


def load_grid(run_dir) -> list[JobSpec]:
    path = Path(run_dir) / GRID_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{run_dir} has no {GRID_FILE}; valid: a run folder written by run_all.py") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GridError(f"{path} is unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != GRID_SCHEMA:
        raise GridError(f"{path} is not a schema-{GRID_SCHEMA} grid")
    try:
        return [JobSpec.from_dict(d) for d in data["specs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise GridError(f"{path}: bad job spec ({exc})") from None
