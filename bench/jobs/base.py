"""What a job kind is: one entry of the registry in `bench/jobs/__init__.py`.

A kind says how to run one of its jobs, which spec fields form its key, which other kinds it needs the
records of, and which columns it adds to a report. Everything that used to be spread over the grid,
the runner and the report about "what an accuracy job is" lives in its `JobKind`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from ..spec import JobSpec

# The fields every kind reads: what is measured and on which configuration.
CONFIGURATION = ("kind", "model", "method", "keep_ratio", "layers", "method_options")
_DEFAULTS = {f.name: f.default for f in fields(JobSpec) if f.name not in ("kind", "model")}


@dataclass(frozen=True)
class ReportPart:
    """The columns a kind adds to a report's summary (one row per configuration and conditions).

    renames: spec fields renamed to say which measurement they condition (dtype -> acc_dtype);
    conditions: the (renamed) fields that keep two records of one configuration apart;
    values: the metric values the summary keeps."""

    renames: dict = field(default_factory=dict)
    conditions: tuple[str, ...] = ()
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobContext:
    """What a running job may use besides its spec: the run folder and its dependencies' records."""

    run_dir: Path
    upstream: dict  # kind name -> the finished `records.Record` this job depends on

    def record_of(self, kind: str):
        if kind not in self.upstream:
            raise KeyError(f"this job has no finished {kind} dependency")
        return self.upstream[kind]


@dataclass(frozen=True)
class JobKind:
    name: str
    run: Callable[[JobSpec, JobContext], dict]  # the record's metrics
    key_fields: tuple[str, ...]  # beside CONFIGURATION; every other field takes its default
    report: ReportPart = ReportPart()
    depends_on: tuple[str, ...] = ()  # kinds whose `upstream_of` may name a job this one needs
    upstream_of: Callable[[JobSpec], JobSpec | None] | None = None  # the job of THIS kind a spec needs
    measures: bool = True  # selectable with --metrics (a finetune job is made as a dependency instead)
    default: bool = True  # measured when --metrics is not given (a trace is costly and asked for by name)
    holds_device: bool = False  # timing: no other job may share its device while it runs
    checkpointable: bool = False  # long: requeued on timeout or preemption and resumed
    data_parallel: bool = False  # may run as several processes (one per GPU, --finetune-gpus)
    validate: Callable[[JobSpec], None] | None = None  # pre-flight of the kind's own settings

    def normalise(self, spec: JobSpec) -> JobSpec:
        """`spec` with every field this kind does not read reset to its default."""
        keep = set(CONFIGURATION) | set(self.key_fields)
        return replace(spec, kind=self.name, **{k: v for k, v in _DEFAULTS.items() if k not in keep})
