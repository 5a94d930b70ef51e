"""Probation: a new version is swapped into its pipeline and watched (invoke errors,
non-finite outputs, p95 latency, too few results); it passes (`store.activate`, the active
pointer moves) or is swapped back (the pointer never moved). A durable marker
(`<store>/delivery/<pipeline>.probation.json`) counts the agent's deaths during one
version's probation: after `MAX_PROBATION_ATTEMPTS` it fails with `probation-failed`.
Owned by the delivery worker thread."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgeagent.config import DeliveryConfig, PipelineConfig
from edgeagent.delivery.agent_view import DeliveryPipeline, PipelineLookup
from edgeagent.delivery.reporting import DeliveryReport
from edgeagent.delivery.signing import DeliveryError
from edgeagent.delivery.store import ModelStore, StoredModel
from edgeagent.delivery.transfer import fsync_dir, write_file_durably
from edgeagent.errors import EdgeAgentError
from edgeagent.modelfile.catalog import Declared, ModelDescription, describe_file
from edgeagent.mqtt.payload import to_json
from edgeagent.pipeline import PipelineStats

_log = logging.getLogger(__name__)

TICK_S: Final = 0.2  # how often timers and probation are checked
SWAP_TIMEOUT_S: Final = 30.0
MAX_PROBATION_ATTEMPTS: Final = 2  # agent deaths during one version's probation
_STALL_LIMIT_FACTOR: Final = 3.0  # probation ends as failed after this x probation_s
_MARKER_DIR: Final = "delivery"


def describe_stored(stored: StoredModel, config: PipelineConfig) -> ModelDescription:
    """A pipeline's description of an installed version, by the catalog's one precedence
    (`catalog.describe_file`): the pipeline config, then the delivery manifest's task,
    labels and preprocess, then the model's TFLite metadata, then its graph."""
    m = stored.manifest
    return describe_file(
        stored.path,
        Declared(m.task, m.labels, m.preprocess, origin="the delivery manifest"),
        name=m.name,
        version=m.version,
        task=config.task,
        labels=config.labels,
        preprocess=config.preprocess,
    )


@dataclass(slots=True)
class _Probation:
    pipeline: DeliveryPipeline
    model: ModelDescription
    previous: ModelDescription
    started: float
    invoke_errors: int
    non_finite: int
    results_out: int
    old_p95: float | None


class Probations:
    """The pipelines on probation now, their checks and their markers."""

    def __init__(
        self,
        config: DeliveryConfig,
        store: ModelStore,
        pipelines: PipelineLookup,
        report: DeliveryReport,
    ) -> None:
        self._config = config
        self._store = store
        self._pipelines = pipelines
        self._report = report
        self._marker_dir = store.root / _MARKER_DIR
        self._probation: dict[str, _Probation] = {}

    def __contains__(self, pipeline: str) -> bool:
        return pipeline in self._probation

    def start(self, pipeline_name: str, stored: StoredModel) -> None:
        """Swaps `stored` into the pipeline and starts watching it; a version that cannot
        load, or that the agent died with too often, fails at once."""
        pipeline = self._pipelines.pipeline(pipeline_name)
        previous = pipeline.model if pipeline is not None else None
        if pipeline is None or previous is None:
            return
        model = describe_stored(stored, pipeline.config)
        attempts = self._marker_attempts(pipeline_name, model)
        if attempts >= MAX_PROBATION_ATTEMPTS:
            self._report.fail(
                pipeline_name,
                model.name,
                model.version,
                "probation-failed",
                f"agent-restart: the agent stopped {attempts} times during the probation of "
                f"{model.name} {model.version}; it is not tried again until the desired version "
                "changes",
            )
            return
        old_p95 = _invoke_p95(pipeline.stats)
        self._write_marker(pipeline_name, model, attempts + 1)
        try:
            pipeline.swap(model, SWAP_TIMEOUT_S)
        except EdgeAgentError as exc:
            self._remove_marker(pipeline_name)
            self._report.fail(pipeline_name, model.name, model.version, "load-failed", str(exc))
            return
        stats = pipeline.stats
        self._probation[pipeline_name] = _Probation(
            pipeline=pipeline,
            model=model,
            previous=previous,
            started=time.monotonic(),
            invoke_errors=stats.invoke_errors,
            non_finite=stats.non_finite,
            results_out=stats.results_out,
            old_p95=old_p95,
        )
        self._report.set_staged(pipeline_name, None)
        _log.info(
            "pipeline %s: now running %s %s (was %s) on probation for %g s",
            pipeline_name,
            model.name,
            model.version,
            previous.version,
            self._config.probation_s,
        )
        self._report.event("activated", pipeline_name, model.name, model.version)
        self._report.publish()

    def check(self) -> None:
        """Checks every probation: passed, failed, or still watched; drops those whose
        pipeline was stopped or restarted."""
        for name, probation in list(self._probation.items()):
            if self._pipelines.pipeline(name) is not probation.pipeline:
                # Stopped or restarted (on the active, previous version): nothing to watch.
                _log.info("pipeline %s was restarted: its probation is abandoned", name)
                del self._probation[name]
                self._remove_marker(name)
                self._report.publish()
                continue
            self._check(name, probation)

    def end_and_swap_back(self, name: str) -> ModelDescription | None:
        """Ends `name`'s probation by switching back to the version that ran before it and
        returns that version; None when `name` is not on probation."""
        probation = self._probation.pop(name, None)
        if probation is None:
            return None
        swap_back(probation.pipeline, probation.previous)
        self._remove_marker(name)
        return probation.previous

    def abandon_all(self) -> None:
        """A clean stop is no death during probation: the markers go."""
        for name in list(self._probation):
            self._remove_marker(name)

    def _check(self, name: str, probation: _Probation) -> None:
        stats = probation.pipeline.stats
        elapsed = time.monotonic() - probation.started
        results = stats.results_out - probation.results_out
        cfg = self._config
        if stats.invoke_errors > probation.invoke_errors:
            errors = stats.invoke_errors - probation.invoke_errors
            self._failed(
                name, "invoke-errors", f"{errors} invoke error(s) (last: {stats.last_error})"
            )
        elif stats.non_finite > probation.non_finite:
            bad = stats.non_finite - probation.non_finite
            self._failed(
                name, "non-finite", f"{bad} of {results} result(s) held NaN or infinite outputs"
            )
        elif elapsed >= cfg.probation_s and results >= cfg.probation_min_results:
            p95 = _invoke_p95(stats, last=results)
            old = probation.old_p95
            if (
                old is not None
                and p95 is not None
                and p95 > cfg.latency_factor * old
                and p95 - old > cfg.latency_floor_ms
            ):
                self._failed(
                    name,
                    "latency",
                    f"p95 invoke latency {p95:.2f} ms is over {cfg.latency_factor:g} x the "
                    f"previous model's {old:.2f} ms",
                )
            else:
                self._passed(name, probation)
        elif elapsed >= max(cfg.probation_s, TICK_S) * _STALL_LIMIT_FACTOR:
            self._failed(
                name,
                "too-few-results",
                f"only {results} result(s) in {elapsed:.0f} s, {cfg.probation_min_results} "
                "needed: the model may hang in invoke",
            )

    def _passed(self, name: str, probation: _Probation) -> None:
        model = probation.model
        try:
            self._store.activate(model.name, model.version)
        except DeliveryError as exc:
            self._failed(name, "activate", exc.message)
            return
        del self._probation[name]
        self._remove_marker(name)
        try:
            self._store.prune(model.name)
        except DeliveryError as exc:
            _log.warning("cannot prune old versions of %s: %s", model.name, exc)
        _log.info("pipeline %s: %s %s passed probation", name, model.name, model.version)
        self._report.event("probation-passed", name, model.name, model.version)
        self._report.publish()

    def _failed(self, name: str, check: str, why: str) -> None:
        probation = self._probation.pop(name)
        model, previous = probation.model, probation.previous
        swap_back(probation.pipeline, previous)
        self._remove_marker(name)
        self._report.fail(
            name,
            model.name,
            model.version,
            "probation-failed",
            f"{check}: {why}; rolled back to {previous.version}",
            event="rolled-back",
        )

    # --- the probation marker (see the module doc) ------------------------------------

    def _marker_path(self, pipeline: str) -> Path:
        return self._marker_dir / f"{pipeline}.probation.json"

    def _marker_attempts(self, pipeline: str, model: ModelDescription) -> int:
        try:
            marker = json.loads(self._marker_path(pipeline).read_bytes())
            if marker["model"] == model.name and marker["version"] == model.version:
                return int(marker["attempts"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning("ignoring the unreadable probation marker of %s: %s", pipeline, exc)
        return 0

    def _write_marker(self, pipeline: str, model: ModelDescription, attempts: int) -> None:
        body = {"model": model.name, "version": model.version, "attempts": attempts}
        try:
            self._marker_dir.mkdir(parents=True, exist_ok=True)
            write_file_durably(self._marker_path(pipeline), to_json(body))
            fsync_dir(self._marker_dir)
        except OSError as exc:
            _log.warning("cannot write the probation marker of %s: %s", pipeline, exc)

    def _remove_marker(self, pipeline: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._marker_path(pipeline).unlink()


def swap_back(pipeline: DeliveryPipeline, model: ModelDescription) -> None:
    """Switches `pipeline` back to `model`; a failure is logged (a restart runs it)."""
    name = pipeline.name
    try:
        pipeline.swap(model, SWAP_TIMEOUT_S)
    except EdgeAgentError as exc:
        # The active pointer still names the previous version: a restart runs it.
        _log.error(
            "pipeline %s: cannot switch back to %s %s: %s; restart the agent to run it",
            name,
            model.name,
            model.version,
            exc,
        )


def _invoke_p95(stats: PipelineStats, last: int | None = None) -> float | None:
    """p95 invoke latency (ms) of the pipeline's recent results, or of the `last` ones
    (during probation: only the new model's)."""
    p95 = stats.percentiles(last).get("invoke", {}).get("p95")
    return float(p95) if p95 is not None else None


__all__ = ["MAX_PROBATION_ATTEMPTS", "SWAP_TIMEOUT_S", "TICK_S", "Probations", "describe_stored"]
