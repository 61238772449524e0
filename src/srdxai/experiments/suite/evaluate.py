"""Your model, your data, your methods and metrics (``srdxai bench --arch/--builder --data``,
or ``srdxai.experiments.evaluate``): every named method on every sample, scored by every
named metric of the registry; see ``srdxai.experiments.own`` for the setup."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import InvalidInputError
from ..config import BenchConfig
from ..data import Source
from ..own import maps_name, own_data, pack_maps
from ..registry import (
    Experiment,
    MethodRow,
    UnitInputs,
    UnitResult,
    register_experiment,
)

__all__ = ["Evaluate", "result_rows"]

Tensor = torch.Tensor


def result_rows(name: str, result: Any
                ) -> tuple[dict[str, Tensor], dict[str, tuple[list, Tensor]]]:
    """A metric's result as per-sample rows (name -> (N,)) and curves (name -> (x, (N, T))).

    A score tensor is one row under the metric's name; a curve result gives its area (or
    AOPC, area over the curve) under the metric's name and its curve; Sensitivity-n its mean
    over n and its curve; an MPRT result the similarity after the last step per measure
    (``name[measure]``) and the curve over the steps."""
    if isinstance(result, Tensor):
        return {name: result}, {}
    rows: dict[str, Tensor] = {}
    curves: dict[str, tuple[list, Tensor]] = {}
    if hasattr(result, "similarity"):  # MPRTResult
        steps = list(range(1, len(result.layers) + 1))
        for measure, values in result.similarity.items():
            rows[f"{name}[{measure}]"] = values[-1]
            curves[f"{name}[{measure}]"] = (steps, values.T)
        return rows, curves
    if hasattr(result, "n_grid"):  # SensitivityNResult
        return ({name: torch.nanmean(result.curve, dim=1)},
                {name: (result.n_grid.tolist(), result.curve)})
    for field in ("aopc", "aoc", "auc"):  # the summary of a curve result
        if hasattr(result, field):
            rows[name] = getattr(result, field)
            break
    if not rows:
        raise InvalidInputError(f"the result of {name} ({type(result).__name__}) has no "
                                "per-sample score to store")
    if hasattr(result, "fractions"):
        curves[name] = (result.fractions.tolist(), result.curve)
    else:
        steps = list(range(1, result.curve.shape[1] + 1))
        curves[name] = (steps, result.curve)
    return rows, curves


@register_experiment
class Evaluate(Experiment):
    """The ``evaluate`` experiment: runs only when the configuration holds your setup."""

    name = "evaluate"
    title = "Your model and data"
    report_position = 5
    optional = True

    def sources(self, config: BenchConfig) -> list[Source]:
        if config.own is None:
            return []
        return [Source(config.own.model_name, "own")]

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        assert config.own is not None
        return [(m, m, {}) for m in config.own.methods]

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        assert config.own is not None
        n = len(own_data(config.own))
        return n if config.samples is None else min(n, config.samples)

    def plan(self, source: Source, config: BenchConfig) -> list:
        from ...metrics import METRICS

        assert config.own is not None
        config.own.check()
        data = own_data(config.own)
        for metric in config.own.metric_names(data.has_masks):
            if "masks" in METRICS[metric].needs and not data.has_masks:
                raise InvalidInputError(
                    f"{metric} needs object masks and the data has none: put one mask per "
                    "image under masks/ in the data folder (or pass (x, y, masks) items)")
        return super().plan(source, config)

    def run(self, unit: UnitInputs) -> UnitResult:
        from ... import metrics

        own = unit.config.own
        assert own is not None
        x, y = unit.x, unit.y
        if own.targets == "predicted" or bool((y < 0).any()):
            with torch.no_grad():
                predicted = unit.model(x).argmax(1)
            y = predicted if own.targets == "predicted" else torch.where(y < 0, predicted, y)
        maps = self._maps(unit, own, y)
        out = UnitResult()
        if own.save_maps:
            out.maps[maps_name(unit.job.source.model, unit.job.unit.method,
                               unit.job.unit.unit)] = pack_maps(unit.job.samples, maps,
                                                                unit.config.hash())
        explain_fn = unit.explain_fn()
        sampling = metrics.Sampling(seed=unit.seed)
        for name in own.metric_names(unit.masks is not None):
            info = metrics.METRICS[name]
            extra: dict[str, Any] = {}
            if "masks" in info.needs:
                extra["masks"] = unit.masks
            if "explain" in info.needs:
                extra["explain"] = explain_fn
            result = info.function(unit.model, x, y, maps, sampling=sampling, **extra) if (
                "sampling" in _parameters(info.function)) else info.function(
                unit.model, x, y, maps, **extra)
            rows, curves = result_rows(name, result)
            for row, values in rows.items():
                out.rows += unit.rows(row, values)
            for curve, (xs, ys) in curves.items():
                out.curves += unit.curves(curve, xs, ys)
        return out

    def _maps(self, unit: UnitInputs, own: Any, y: Tensor) -> Tensor:
        if own.maps_from is None:
            return unit.explain(unit.x, y)
        found = _previous_maps(own.maps_from, own)
        key = (unit.job.source.model, unit.job.unit.method)
        if key not in found:
            raise InvalidInputError(
                f"{own.maps_from} holds no saved maps of {key[1]} on {key[0]}: run it with "
                "--save-maps and the same model, data and methods")
        samples, maps = found[key]
        where = {int(s): i for i, s in enumerate(samples)}
        missing = [s for s in unit.job.samples if s not in where]
        if missing:
            raise InvalidInputError(
                f"{own.maps_from} has no saved map of sample(s) {missing[:5]} for {key[1]}")
        picked = np.stack([maps[where[s]] for s in unit.job.samples])
        return torch.from_numpy(picked).to(unit.x.device)


def _parameters(function: Any) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)


_PREVIOUS: dict[str, Any] = {}
#: what a saved map depends on: a run may reuse another's maps only if these are equal
MAP_FIELDS = ("arch", "builder", "weights", "num_classes", "model_fingerprint", "data",
              "data_fingerprint", "size", "mean", "std", "classes", "targets")


def _previous_maps(run_dir: str, own: Any) -> Any:
    """A previous run's saved maps (read once per process), after checking that they were
    made from the same model, data and targets as ``own``'s."""
    if run_dir not in _PREVIOUS:
        from pathlib import Path

        from ...report.tables import run_info
        from ..own import saved_maps
        from ..store import merged_path

        stored = (run_info(merged_path(Path(run_dir))).config or {}).get("own") or {}
        _PREVIOUS[run_dir] = (stored, saved_maps(run_dir))
    stored, maps = _PREVIOUS[run_dir]
    differ = [f for f in MAP_FIELDS if _plain(stored.get(f)) != _plain(getattr(own, f))]
    if differ:
        raise InvalidInputError(
            f"{run_dir} made its maps with another {', '.join(differ)}: reuse maps only from "
            "a run of the same model, data and targets")
    return maps


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
