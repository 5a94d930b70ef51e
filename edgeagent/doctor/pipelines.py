"""The per-pipeline checks: each enabled pipeline's model loads and runs on the CPU, and its
source passes the pre-flight check its settings declare (`SourceSettings.preflight`)."""

from __future__ import annotations

import time

from edgeagent.config import PipelineConfig
from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict
from edgeagent.errors import EdgeAgentError


def check_pipelines(context: CheckContext) -> list[CheckResult]:
    if context.config is None:
        return [
            CheckResult("pipelines", Verdict.SKIP, False, f"{context.config_note}: no pipelines")
        ]
    results = []
    for p in context.config.pipelines:
        if not p.enabled:
            note = "disabled (enabled: false)"
            results.append(CheckResult(f"pipeline.{p.name}.model", Verdict.SKIP, False, note))
            results.append(CheckResult(f"pipeline.{p.name}.source", Verdict.SKIP, False, note))
            continue
        results.append(pipeline_model_result(p))
        results.append(pipeline_source_result(p, context.env))
    if not results:
        results.append(
            CheckResult(
                "pipelines",
                Verdict.WARN,
                False,
                "the configuration has no pipelines: the agent will run but infer nothing",
                "add a pipeline (docs/configuration.md)",
            )
        )
    return results


def pipeline_model_result(pipeline: PipelineConfig) -> CheckResult:
    """Resolves the model and loads it as the pipeline does, on the CPU (one warm-up)."""
    from edgeagent.modelfile.catalog import describe_model
    from edgeagent.pipeline import build_runner

    name = f"pipeline.{pipeline.name}.model"
    started = time.monotonic()
    try:
        model = describe_model(
            pipeline.model,
            task=pipeline.task,
            labels=pipeline.labels,
            preprocess=pipeline.preprocess,
        )
        runner = build_runner(model, pipeline, accelerator="cpu")
    except (EdgeAgentError, ValueError) as exc:
        return CheckResult(
            name,
            Verdict.FAIL,
            True,
            f"model {pipeline.model!r} cannot run: {exc}",
            "fix the pipeline's model (a bundled name or a .tflite path) as the message says",
            {"model": pipeline.model},
        )
    runner.engine.close()
    ms = (time.monotonic() - started) * 1000
    return CheckResult(
        name,
        Verdict.OK,
        True,
        f"{model.name} {model.version} ({model.task.type}) loads and runs on the CPU "
        f"in {ms:.0f} ms",
        None,
        {"model": pipeline.model, "path": str(model.path), "version": model.version},
    )


def pipeline_source_result(pipeline: PipelineConfig, env: Environment) -> CheckResult:
    """Whether the source's backend and what it reads are there (without opening it)."""
    kind = pipeline.source.type
    found = pipeline.source.preflight(env)
    return CheckResult(
        f"pipeline.{pipeline.name}.source",
        Verdict.OK if found.ok else Verdict.FAIL,
        True,
        f"{kind}: {found.finding}",
        found.fix,
        {"type": kind, **found.details},
    )
