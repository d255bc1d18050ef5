"""Job specs: one job of one configuration, frozen, JSON-serialisable, keyed by content hash.

A spec names its job kind (`bench.jobs`); the kind says which fields it reads, and `JobSpec.key` hashes
exactly the spec after `bench.jobs.normalise` reset the others, so changing a setting a kind does not
read (the eval data of a FLOPs job, say) never invalidates its records.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")
EMBEDDED_DATA = "fashion-mnist"  # the default eval set; anything else is an ImageNet-style folder
EMBEDDED_MODEL = "tokenbench_vit_fmnist"  # the default model: a small ViT the project ships, trained on it
OFF_THE_SHELF = "off-the-shelf"


def pairs(mapping: dict | None) -> tuple[tuple[str, Any], ...]:
    """A dict as the sorted (name, value) pairs a frozen spec holds; list values become tuples."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (mapping or {}).items()))


def regime_of(finetune) -> str:
    """'off-the-shelf' for no finetune settings, else 'finetuned N ep' (N the settings' epochs)."""
    settings = dict(finetune or ())
    return f"finetuned {float(settings.get('epochs', 0)):g} ep" if settings else OFF_THE_SHELF


def _method_revision(name: str) -> int:
    import methods  # here, not at the top: parsing a command line builds specs and must not load torch

    try:
        return methods.get_method(name).revision
    except methods.MethodError:  # an unknown name is refused where the spec is validated
        return 0


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines one job. Two equal specs give the same key and the same record."""

    kind: str  # a registered job kind (bench.jobs): acc, flops, throughput, finetune, ...
    model: str  # timm model name
    method: str = "none"  # canonical method name
    keep_ratio: float = 1.0
    layers: tuple[int, ...] | None = None  # None: the method's default layers
    method_options: tuple[tuple[str, Any], ...] = ()  # options that differ from the defaults, coerced
    checkpoint: str | None = None  # absolute path of a local checkpoint file
    pretrained: bool = False  # timm's own pretrained weights (download or cache)
    random_weights: bool = False  # the user asked for an untrained model on purpose
    data: str = EMBEDDED_DATA  # EMBEDDED_DATA or an absolute ImageNet-style folder
    limit: int | None = None  # first N eval images
    batch_size: int = 1  # a FLOPs job counts one image
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    finetune: tuple[tuple[str, Any], ...] = ()  # the finetune recipe's settings; () = off-the-shelf
    extra: tuple[tuple[str, Any], ...] = field(default=())  # the kind's measurement knobs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        for name in ("method_options", "finetune", "extra"):
            d[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in getattr(self, name)}
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
        for name in ("method_options", "finetune", "extra"):
            d[name] = pairs(d.get(name))
        return cls(**d)

    @property
    def key(self) -> str:
        """Stable content hash with a kind-method-ratio prefix for humans. A method's non-zero
        `revision` enters the hash, so records of an earlier revision of its algorithm are not reused."""
        content = self.to_dict()
        revision = _method_revision(self.method)
        if revision:
            content["method_revision"] = revision
        canon = json.dumps(content, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha1(canon.encode()).hexdigest()[:12]
        return f"{self.kind}-{self.method}-{self.keep_ratio:g}-{digest}"

    def options(self) -> dict:
        return dict(self.method_options)

    @property
    def regime(self) -> str:
        """'off-the-shelf', or 'finetuned N ep' for a model finetuned with its method in place."""
        return regime_of(self.finetune)

    def with_kind(self, kind: str, **changes) -> "JobSpec":
        return replace(self, kind=kind, **changes)


@dataclass(frozen=True)
class Plan:
    """A checked grid, ready to dispatch: nothing of it has been written yet."""

    run_dir: Any  # Path of the run folder
    jobs: tuple[JobSpec, ...]  # this request's jobs, dependencies included and placed first
    grid: tuple[JobSpec, ...]  # what grid.json will hold: the folder's earlier jobs, then these
    origin: dict = field(default_factory=dict)  # provenance of the checkout the run was planned from
