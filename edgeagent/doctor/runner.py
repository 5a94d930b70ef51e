"""`run_checks`: every check family, in display order; it never raises (a check that
crashes is reported as a failed, non-critical check)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edgeagent.doctor.accelerators import check_accelerators, check_edgetpu_runtime
from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict
from edgeagent.doctor.broker import check_broker
from edgeagent.doctor.config import check_config
from edgeagent.doctor.pipelines import check_pipelines
from edgeagent.doctor.runtime import check_litert, check_python, check_resize
from edgeagent.doctor.sources import check_camera, check_i2c
from edgeagent.doctor.storage import check_disk, check_model_store
from edgeagent.doctor.tls import check_certificates, check_clock

log = logging.getLogger(__name__)


def run_checks(
    config_path: Path | None, *, required: bool = True, env: Environment | None = None
) -> list[CheckResult]:
    """Every check, in display order. `required`: a missing `config_path` is a failure
    (the operator named it) rather than a note (the default path)."""
    env = env or Environment()
    results: list[CheckResult] = []
    config_check, context = check_config(config_path, required=required, env=env)
    results.append(config_check)
    checks: list[Callable[[CheckContext], list[CheckResult]]] = [
        lambda _c: [check_python()],
        lambda _c: [check_litert()],
        check_resize,
        check_accelerators,
        check_edgetpu_runtime,
        check_camera,
        check_i2c,
        check_clock,
        check_certificates,
        check_broker,
        check_disk,
        check_model_store,
        check_pipelines,
    ]
    for check in checks:
        try:
            results.extend(check(context))
        except Exception as exc:  # one broken check must not hide the others
            log.debug("check %s crashed", getattr(check, "__name__", check), exc_info=True)
            name = getattr(check, "__name__", "check").lstrip("_").removeprefix("check_")
            results.append(
                CheckResult(
                    name,
                    Verdict.FAIL,
                    False,
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a bug in edgeagent doctor, with `edgeagent -v doctor`",
                )
            )
    return results
