"""`edgeagent models list|activate|rollback`: the model store on this device.

The store is `<state_dir>/models` of the configuration (`--config`, default
/etc/edgeagent/config.yaml), or the directory given with `--store`.

A running agent reads the store when it starts and when a delivery arrives, not when this
command changes it. So after `activate` or `rollback` the output says how to switch the
running pipeline (restart the service, or the fleet's `model.rollback` command).
`apply_change` is the one place this command changes the active version: when the agent
answers on its control socket it is to ask the agent instead, which then switches the
running pipeline too.

`list --json` prints::

    {"store": "/var/lib/edgeagent/models", "exists": true, "problems": [...],
     "models": [{"name": ..., "active": "1.1" | null, "previous": ["1.0"],
                 "versions": [{"version", "active", "previous", "size", "sha256",
                               "installed_at", "integrity": "ok" | "<problem>"}]}]}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from edgeagent.config import AgentConfig, load_config
from edgeagent.delivery.store import ModelStore, StoredModel
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.paths import control_socket, model_store_root

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/edgeagent/config.yaml")
# Opened to read, activate and roll back only: installs, which the quota governs, come
# from deliveries in the agent.
_QUOTA_UNUSED = 1 << 40
RUNNING_AGENT_NOTE = (
    "the running agent reads the store only at start and on delivery events: restart the "
    "service (sudo systemctl restart edgeagent) or use the model.rollback command to switch "
    "the running pipeline"
)


def register(commands: Any) -> None:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"agent configuration whose state_dir holds the store (default {DEFAULT_CONFIG})",
    )
    group.add_argument("--store", type=Path, default=None, help="the model store directory")

    parser = commands.add_parser(
        "models",
        description="Inspect and change the on-device model store.",
    )
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[where], help="stored versions, active and previous, integrity"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    activate = actions.add_parser(
        "activate", parents=[where], help="make a stored version the active one"
    )
    activate.add_argument("name")
    activate.add_argument("version")
    rollback = actions.add_parser(
        "rollback", parents=[where], help="re-activate the previous version (or --to VERSION)"
    )
    rollback.add_argument("name")
    rollback.add_argument("--to", dest="to_version", default=None, metavar="VERSION")
    parser.set_defaults(handler=execute)


# --- where the store is ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreLocation:
    root: Path
    control_socket: Path | None  # where a running agent would answer, when known
    how: str  # how the root was found, for messages


def locate_store(config_path: Path | None, store: Path | None) -> StoreLocation:
    """The store from `--store`, else from the configuration (the default path may be
    missing: then the default state directory). ConfigError for a bad configuration."""
    if store is not None:
        return StoreLocation(store, None, "--store")
    path = config_path or DEFAULT_CONFIG
    config: AgentConfig
    if config_path is None and not path.exists():
        try:
            config = AgentConfig()
        except ValidationError as exc:
            raise ConfigError(
                f"{path} does not exist and the default configuration is not valid here "
                f"({exc.errors()[0]['msg']}): pass --config FILE or --store DIR"
            ) from exc
        how = f"the default state directory ({path} does not exist)"
    else:
        config = load_config(path)
        how = f"state_dir of {path}"
    return StoreLocation(model_store_root(config), control_socket(config), how)


def open_store(location: StoreLocation) -> ModelStore:
    if not location.root.is_dir():
        raise EdgeAgentError(
            f"there is no model store at {location.root} (from {location.how}): it is "
            "created by the first model delivery; check --config or --store"
        )
    return ModelStore(location.root, quota_bytes=_QUOTA_UNUSED, repair=False)


# --- changing the active version -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveChange:
    """A request to change the active version of a model."""

    action: Literal["activate", "rollback"]
    name: str
    version: str | None  # activate: the version; rollback: the target, None for previous


@dataclass(frozen=True, slots=True)
class ChangeOutcome:
    name: str
    version: str  # active now
    was: str | None  # active before
    applied_by: Literal["store", "agent"]
    note: str | None  # what the operator still has to do, if anything


def apply_change(change: ActiveChange, location: StoreLocation) -> ChangeOutcome:
    """Carries out `change`. Today it always writes the store directly (`change_in_store`);
    this is where asking a running agent over `location.control_socket` belongs, so that
    the agent switches its pipelines as well."""
    outcome = change_in_store(change, location)
    running = location.control_socket is not None and agent_answers(location.control_socket)
    note = RUNNING_AGENT_NOTE
    if running:
        note = f"the agent is running (control socket {location.control_socket}); {note}"
    return ChangeOutcome(outcome.name, outcome.version, outcome.was, "store", note)


def change_in_store(change: ActiveChange, location: StoreLocation) -> ChangeOutcome:
    """Activates or rolls back in the store files; DeliveryError says why not."""
    store = open_store(location)
    before = store.active(change.name)
    if change.action == "activate":
        assert change.version is not None
        now = store.activate(change.name, change.version)
    else:
        now = store.rollback(change.name, to_version=change.version)
    _keep_owner(location.root)
    return ChangeOutcome(
        change.name, now.version, before.version if before else None, "store", None
    )


def agent_answers(path: Path) -> bool:
    """Whether something accepts connections on the control socket `path`."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _keep_owner(root: Path) -> None:
    """Run as root, the pointer files written here would belong to root; give them to the
    store's owner (the service user), who must be able to replace them later."""
    if os.geteuid() != 0:
        return
    owner = root.stat()
    for path in (root / "active", *sorted((root / "active").glob("*"))):
        info = path.lstat()
        if (info.st_uid, info.st_gid) != (owner.st_uid, owner.st_gid):
            os.lchown(path, owner.st_uid, owner.st_gid)


# --- listing ---------------------------------------------------------------------------------


def describe_store(location: StoreLocation) -> dict[str, Any]:
    """The `list --json` object (see the module docstring)."""
    if not location.root.is_dir():
        return {"store": str(location.root), "exists": False, "problems": [], "models": []}
    store = open_store(location)
    problems = store.verify_integrity()
    models = []
    for name in store.names():
        active = store.active(name)
        previous = [s.version for s in store.previous(name)]
        versions = [_describe_version(s, active, previous, problems) for s in store.versions(name)]
        models.append(
            {
                "name": name,
                "active": active.version if active else None,
                "previous": previous,
                "versions": versions,
            }
        )
    return {"store": str(location.root), "exists": True, "problems": problems, "models": models}


def _describe_version(
    stored: StoredModel, active: StoredModel | None, previous: list[str], problems: list[str]
) -> dict[str, Any]:
    prefix = f"{stored.directory}: "
    found = [p.removeprefix(prefix) for p in problems if p.startswith(prefix)]
    return {
        "version": stored.version,
        "active": active is not None and active.version == stored.version,
        "previous": stored.version in previous,
        "size": stored.manifest.size,
        "sha256": stored.manifest.sha256,
        "installed_at": datetime.fromtimestamp(stored.installed_ns / 1e9, UTC).isoformat(
            timespec="seconds"
        ),
        "integrity": "; ".join(found) if found else "ok",
    }


def render_listing(report: dict[str, Any]) -> str:
    if not report["exists"]:
        return f"no model store at {report['store']} yet (the first delivery creates it)"
    lines = [f"model store {report['store']}"]
    if not report["models"]:
        lines.append("  no models installed")
    for model in report["models"]:
        lines.append("")
        active = model["active"] or "none"
        lines.append(f"{model['name']}  (active: {active})")
        for v in model["versions"]:
            role = "active" if v["active"] else "previous" if v["previous"] else ""
            lines.append(
                f"  {'*' if v['active'] else ' '} {v['version']:<12} {role:<8} "
                f"{_size(v['size']):>9}  installed {v['installed_at']}  {v['integrity']}"
            )
    unattached = [
        p
        for p in report["problems"]
        if not any(
            f"/{m['name']}/{v['version']}:" in p for m in report["models"] for v in m["versions"]
        )
    ]
    if unattached:
        lines.append("")
        lines.append("problems:")
        lines += [f"  {p}" for p in unattached]
    return "\n".join(lines)


def _size(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    if size >= 1 << 10:
        return f"{size / (1 << 10):.1f} KiB"
    return f"{size} B"


# --- the command -----------------------------------------------------------------------------


def execute(args: argparse.Namespace) -> int:
    if not args.verbose:  # the output says what changed; the store logs it at info too
        logging.getLogger().setLevel(logging.WARNING)
    location = locate_store(args.config, args.store)
    if args.models_command == "list":
        report = describe_store(location)
        print(json.dumps(report, indent=2) if args.json else render_listing(report))
        return 1 if report["problems"] else 0
    if args.models_command == "activate":
        change = ActiveChange("activate", args.name, args.version)
    else:
        change = ActiveChange("rollback", args.name, args.to_version)
    outcome = apply_change(change, location)
    if outcome.was == outcome.version:
        print(f"{outcome.name} {outcome.version} was already active")
    else:
        print(f"{outcome.name}: {outcome.was or 'none'} -> {outcome.version} (active)")
    if outcome.note:
        print(f"note: {outcome.note}")
    return 0
