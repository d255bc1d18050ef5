"""The job kinds. A new kind is one module in this folder that calls `register(JobKind(...))`, plus its
name on the registration line below.

    from bench import jobs
    jobs.get("acc").run(spec, context)      # what `bench.dispatch.runner.run_job` does
    jobs.measuring()                          # kinds --metrics may name: ['acc', 'flops', 'throughput', 'trace']
    jobs.defaults()                           # the kinds of a grid without --metrics: ['acc', 'flops', 'throughput']
"""
from __future__ import annotations

from ..spec import JobSpec
from .base import CONFIGURATION, JobContext, JobKind, ReportPart  # noqa: F401

_KINDS: dict[str, JobKind] = {}


class UnknownKind(ValueError):
    """A job kind name that is not registered."""


def register(kind: JobKind) -> JobKind:
    if kind.name in _KINDS:
        raise ValueError(f"job kind {kind.name!r} registered twice")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> JobKind:
    if name not in _KINDS:
        raise UnknownKind(f"unknown job kind {name!r}; valid: {', '.join(_KINDS)}")
    return _KINDS[name]


def available() -> list[str]:
    return list(_KINDS)


def measuring() -> list[str]:
    """The kinds a user selects with --metrics (the others are made as dependencies)."""
    return [name for name, kind in _KINDS.items() if kind.measures]


def defaults() -> list[str]:
    """The measuring kinds a grid runs when --metrics is not given."""
    return [name for name, kind in _KINDS.items() if kind.measures and kind.default]


def normalise(spec: JobSpec) -> JobSpec:
    return get(spec.kind).normalise(spec)


def dependencies(spec: JobSpec) -> list[JobSpec]:
    """The jobs `spec` needs the records of, normalised; their own dependencies are not included."""
    out = []
    for name in get(spec.kind).depends_on:
        upstream = get(name).upstream_of(spec)
        if upstream is not None:
            out.append(get(name).normalise(upstream))
    return out


# Registration: one module per kind (import order = order in tables).
from . import accuracy, flops, throughput, finetune, trace  # noqa: E402,F401
