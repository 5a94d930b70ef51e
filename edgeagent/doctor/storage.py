"""The storage checks: free disk space for the outbox and model deliveries, and the
read-only integrity of the on-device model store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeagent.config import AgentConfig
from edgeagent.doctor.base import MIB, CheckContext, CheckResult, Environment, Verdict
from edgeagent.paths import model_store_root, outbox_path, state_dir

MODEL_STORE_QUOTA = 1 << 40
"""The store is opened only to read it here, so its quota does not matter."""


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_disk(context: CheckContext) -> list[CheckResult]:
    config = context.config or context.defaults
    if config is None:
        return [CheckResult("disk", Verdict.SKIP, True, "no configuration and no default paths")]
    return [disk_result(config, context.env, defaults=context.config is None)]


def disk_result(config: AgentConfig, env: Environment, *, defaults: bool = False) -> CheckResult:
    """Free space for the outbox and the model store, against `min_free_bytes` and the
    outbox's bound."""
    state = state_dir(config)
    outbox = outbox_path(config)
    measured = _existing_ancestor(state)
    usage = shutil.disk_usage(measured)
    outbox_used = sum(
        p.stat().st_size for p in (outbox, outbox.with_name(outbox.name + "-wal")) if p.exists()
    )
    growth = max(config.outbox.max_bytes - outbox_used, 0) if config.outbox.enabled else 0
    details = {
        "state_dir": str(state),
        "measured_at": str(measured),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "outbox_max_bytes": config.outbox.max_bytes if config.outbox.enabled else 0,
        "outbox_used_bytes": outbox_used,
        "min_free_bytes": env.min_free_bytes,
    }
    where = f"{state}" + (" (default)" if defaults else "")
    if measured != state:
        where += f", not created yet, measured at {measured}"
    free = f"{usage.free / MIB:.0f} MiB free of {usage.total / MIB:.0f} MiB"
    if usage.free < env.min_free_bytes:
        return CheckResult(
            "disk",
            Verdict.FAIL,
            True,
            f"{free} for {where}: under the {env.min_free_bytes / MIB:.0f} MiB minimum for "
            "the outbox and model deliveries",
            "free space (`sudo journalctl --vacuum-size=50M`, `sudo apt clean`, old files) "
            "or use a larger SD card",
            details,
        )
    if usage.free - env.min_free_bytes < growth:
        return CheckResult(
            "disk",
            Verdict.WARN,
            True,
            f"{free} for {where}: the outbox may grow by {growth / MIB:.0f} MiB more "
            "(outbox.max_bytes), which would not leave the minimum free",
            "lower outbox.max_bytes or free space",
            details,
        )
    return CheckResult("disk", Verdict.OK, True, f"{free} for {where}", None, details)


def check_model_store(context: CheckContext) -> list[CheckResult]:
    config = context.config or context.defaults
    if config is None:
        return [CheckResult("model_store", Verdict.SKIP, False, "no configuration")]
    return [model_store_result(model_store_root(config))]


def model_store_result(root: Path) -> CheckResult:
    """The read-only integrity check of the store at `root` (skip when there is none)."""
    from edgeagent.delivery.store import ModelStore

    details: dict[str, Any] = {"root": str(root)}
    if not root.is_dir():
        return CheckResult(
            "model_store",
            Verdict.SKIP,
            False,
            f"no model store at {root} yet (it is created with the first model delivery)",
            None,
            details,
        )
    store = ModelStore(root, quota_bytes=MODEL_STORE_QUOTA, repair=False)
    try:
        names = store.names()
        problems = store.verify_integrity()
        active = {n: (a.version if (a := store.active(n)) else None) for n in names}
    except OSError as exc:
        return CheckResult(
            "model_store",
            Verdict.FAIL,
            False,
            f"cannot read the model store {root}: {exc}",
            "run doctor as root or as the service user",
            details,
        )
    details.update(active=active, problems=problems)
    if problems:
        return CheckResult(
            "model_store",
            Verdict.FAIL,
            False,
            f"{len(problems)} problem(s) in {root}: {problems[0]}",
            "the agent falls back to intact versions at start; deliver the damaged models "
            "again or roll back with `edgeagent models rollback NAME`",
            details,
        )
    listed = ", ".join(f"{n} {v or '(none active)'}" for n, v in active.items()) or "no models"
    return CheckResult("model_store", Verdict.OK, False, f"{root}: intact; {listed}", None, details)
