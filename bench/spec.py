"""Job specs: one measurement of one configuration, frozen, JSON-serialisable, keyed by content hash."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

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
