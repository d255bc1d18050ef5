"""Ablation sweeps from a file: `python run_all.py --sweep sweeps/idlevit_ablations.toml`.

A sweep file (TOML, or YAML with the same structure) has a `base` table of settings every job shares and
one or more `[[sweep]]` blocks. The axes of a block are crossed; the blocks are unioned. Every point is a
`Request` as the equivalent command line would give it, so a job of a sweep has the same key as the same
job asked for with flags (and a rerun, or a second sweep into the same folder, skips what is done).

    [base]
    methods = ["idle"]
    ratios = [0.5, 0.7]
    metrics = ["acc", "flops"]
    finetune_epochs = 2

    [[sweep]]                      # the cut-loss type
    "finetune.cut_loss" = ["both", "intra", "inter", "none"]

    [[sweep]]                      # the layer presets
    "idle.preset" = ["infer", "main"]

Axes and base keys: `models`, `methods`, `metrics`, `ratios`, `finetune_epochs`, `layers.<method>` (a list
of block lists), `<method>.<option>` (values of a method option), `finetune.<setting>` (values of a recipe
setting), and in `base` also `limit`, `batch_size`, `seed`, `data_dir`, `checkpoint`, `train_dir`. Light to
import: it only reads the file; `bench.grid.plan` checks every value.
"""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from .request import Request

_LISTS = ("models", "methods", "metrics", "ratios")
_BASE_ONLY = ("limit", "batch_size", "seed", "data_dir", "checkpoint", "train_dir")
VALID = ("models, methods, metrics, ratios, finetune_epochs, layers.<method>, <method>.<option>, "
         "finetune.<setting>")


class SweepError(ValueError):
    """A sweep file that cannot be read or names an axis that does not exist."""


def load(path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepError(f"sweep file {str(path)!r} cannot be read ({exc.strerror}); valid: a .toml or .yaml file") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            content = yaml.safe_load(text)
        else:
            content = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise SweepError(f"sweep file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'TOML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(content, dict) or set(content) - {"base", "sweep"}:
        extra = sorted(set(content) - {"base", "sweep"}) if isinstance(content, dict) else ["(not a table)"]
        raise SweepError(f"sweep file {str(path)!r}: unknown section {extra[0]!r}; valid: base, sweep")
    return content


def expand(path, request: Request) -> list[Request]:
    """The requests of every point of every block: `request` (the command line's other flags) with the
    file's base settings, then the point's values."""
    content = load(path)
    base = _apply(request, content.get("base") or {}, base=True)
    blocks = content.get("sweep") or [{}]
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise SweepError(f"sweep file {str(path)!r}: 'sweep' must be a list of tables ([[sweep]] blocks)")
    out = []
    for block in blocks:
        axes = {name: _values(name, values) for name, values in block.items()}
        for point in itertools.product(*axes.values()):
            out.append(_apply(base, dict(zip(axes, point)), base=False))
    return out


def _values(name: str, values: Any) -> list:
    if not isinstance(values, list) or not values:
        raise SweepError(f"sweep axis {name!r} needs a non-empty list of values; got {values!r}")
    return values


def _apply(request: Request, settings: dict, base: bool) -> Request:
    """`request` with `settings` (axis or base key -> one value) applied."""
    changes: dict[str, Any] = {}
    finetune = dict(request.finetune)
    method_options = list(request.method_options)
    layer_sets = list(request.layer_sets)
    for name, value in settings.items():
        head, dot, tail = str(name).partition(".")
        if name in _LISTS:  # a list in base, one value at a point of an axis
            value = value if isinstance(value, list) else [value]
            changes[name] = tuple(float(v) if name == "ratios" else str(v) for v in value)
        elif name == "finetune_epochs":
            finetune["epochs"] = value
        elif base and name in _BASE_ONLY:
            if name == "train_dir":
                finetune["train_data"] = str(Path(value).resolve())
            else:
                changes[{"data_dir": "data"}.get(name, name)] = value
        elif dot and head == "finetune":
            finetune[tail] = value
        elif dot and head == "layers":  # a point replaces the base's layer sets of that method
            layer_sets = [entry for entry in layer_sets if entry[0] != tail]
            layer_sets.append((tail, tuple(int(i) for i in value)))
        elif dot and tail:  # a point replaces the base's value of that option
            method_options = [entry for entry in method_options if entry[:2] != (head, tail)]
            method_options.append((head, tail, value))
        else:
            raise SweepError(f"unknown sweep {'base key' if base else 'axis'} {name!r}; valid: {VALID}"
                             + (f", {', '.join(_BASE_ONLY)}" if base else ""))
    if finetune and "epochs" not in finetune:
        raise SweepError("finetune settings in a sweep need finetune_epochs (in base or as an axis)")
    return replace(request, **changes, finetune=tuple(sorted(finetune.items())),
                   method_options=tuple(method_options), layer_sets=tuple(layer_sets))
