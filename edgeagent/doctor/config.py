"""The configuration check: whether the file loads, and the `CheckContext` every later
check runs with (the loaded configuration, or default paths and why there is none)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from edgeagent.config import AgentConfig, load_config
from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict
from edgeagent.errors import ConfigError


def check_config(
    path: Path | None, *, required: bool, env: Environment
) -> tuple[CheckResult, CheckContext]:
    defaults: AgentConfig | None
    try:
        defaults = AgentConfig()
    except ValidationError:  # the host name is no valid device id; the paths need none
        defaults = None
    if path is None or (not path.exists() and not required):
        where = f"{path} does not exist" if path else "no configuration given"
        note = f"no configuration ({where})"
        return (
            CheckResult(
                "config",
                Verdict.WARN,
                False,
                f"{where}: checking only what needs no configuration, with default paths",
                "install a configuration (deploy/install.sh writes one) or pass --config FILE",
                {"path": str(path) if path else None},
            ),
            CheckContext(env, None, defaults, note),
        )
    try:
        config = load_config(path)
    except ConfigError as exc:
        return (
            CheckResult(
                "config",
                Verdict.FAIL,
                True,
                str(exc),
                "correct the file as the message says (every key: docs/configuration.md)",
                {"path": str(path)},
            ),
            CheckContext(env, None, defaults, "the configuration is invalid"),
        )
    enabled = sum(1 for p in config.pipelines if p.enabled)
    return (
        CheckResult(
            "config",
            Verdict.OK,
            True,
            f"{path} is valid: device {config.device.id}, {enabled} enabled pipeline(s)",
            None,
            {"path": str(path), "device_id": config.device.id, "pipelines": enabled},
        ),
        CheckContext(env, config, config, ""),
    )
