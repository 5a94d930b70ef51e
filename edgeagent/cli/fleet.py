"""`edgeagent fleet`: say which model version devices should run, and follow the rollout.

- `deploy (--device D | --group G) --pipeline P --model N --version V [--allow-downgrade]
  [--clear] [--replace] [--read-timeout S] [--json] [broker options]`: sets one pipeline's
  desired model in the retained desired state of a device (`<prefix>/<device>/desired`) or
  of a group (`<prefix>/group/<group>/desired`). It reads the retained state first (waiting
  up to --read-timeout, default 1 s, when there is none) and changes only that pipeline, so
  other pipelines keep theirs. V must be a semantic version (docs/model-delivery.md). A
  device refuses a version below the highest it has activated (`downgrade`) unless the
  entry was deployed with `--allow-downgrade`. `--clear` removes the pipeline's entry
  instead (no --model or --version). `--replace` ignores an existing state (use it when
  that state is not valid JSON). Going back to an older version is deploying it with
  --allow-downgrade, or the `model.rollback` command; devices also roll back by themselves
  when a new version fails its probation.
- `watch [--device D ...] [--group G] [--json] [--until-converged] [--timeout S]
  [broker options]`: follows status, reported state, events and desired state. Without
  --device, every device that publishes is watched. `--group G` adds the group's desired
  state as each watched device's baseline. `--until-converged` exits 0 once every watched
  device reports running its desired versions, 1 when one reports a failure for a
  desired version or when --timeout (default 300 s) passes first; the reasons are printed.
  Without it, watch runs until interrupted or until --timeout, if given.

- `dashboard [--listen HOST:PORT] [--token-file F] [broker options]`: the fleet in a
  browser (docs/dashboard.md). Listens on 127.0.0.1:8080 by default; any non-loopback
  address is refused without --token-file. Prints its URL, serves until interrupted.

`watch --json` prints one JSON object per line: `{"type": "device", "ts", "device",
"online": bool|null, "pipelines": {"<p>": {"desired": {"model", "version"}|null,
"running": {"model", "version", "state"}|null, "staged": {...}|null, "last_failure":
{...}|null, "last_event": {...}|null, "status": "converged"|"waiting"|"failed"|
"unmanaged", "detail": str}}, "converged": bool}` whenever a device's view changes, and
with --until-converged a last line `{"type": "result", "ts", "outcome":
"converged"|"failed"|"timeout", "converged": bool, "failures": [str], "waiting": [str]}`.
`deploy --json` prints `{"topic", "desired"}` with the desired state it published.

- `simulate --devices N [--group G] [--rate R] [--id-prefix P] [--processes K]
  [--state-dir D] (--trusted-key PEM ... | --allow-unsigned) [--duration S] [--json]
  [broker options]`: N simulated devices (`<P>-0001`...) speaking the real device protocol
  with the agent's own code and a stand-in for inference (edgeagent/fleet/simulate.py),
  until Ctrl-C, SIGTERM or --duration; every device then publishes its `offline` status.
  A summary every --report-every seconds; `--json` prints them as `{"type": "summary"|
  "stopped", "ts", "devices", "online", "results", "backlog", "reconnects", "late",
  "threads", "workers": [pid]}` lines (`results`: made since the start; `backlog`: in the
  devices' outboxes, not yet acknowledged; `results_per_s` from the second summary on).
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent.delivery.signing import check_safe_id, check_version
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.fleet.connection import FleetConnection, add_broker_options, broker_config
from edgeagent.fleet.rollout import Rollout, merge_desired, parse_desired, who
from edgeagent.mqtt.protocol import desired_payload
from edgeagent.mqtt.topics import FleetTopics
from edgeagent.names import check_device_id

EXIT_NOT_CONVERGED = 1
SETTLE_S = 0.5  # retained messages arrive right after the SUBACK; judge only after them


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "fleet",
        description="Set the desired model version of a device's or a group's pipeline "
        "(retained desired state), watch devices converge to it, serve the fleet dashboard, "
        "or simulate devices.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    deploy = actions.add_parser(
        "deploy",
        help="set the desired model version of one pipeline",
        description="Merge one pipeline's desired model into the retained desired state "
        "of a device or group. Devices refuse a version older than the highest they have "
        "activated unless --allow-downgrade is given.",
    )
    target = deploy.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one device id")
    target.add_argument("--group", help="a device group")
    deploy.add_argument("--pipeline", required=True, help="pipeline name on the device(s)")
    deploy.add_argument("--model", help="model name (as published)")
    deploy.add_argument("--version", help="model version (as published; a semantic version)")
    deploy.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let devices go below the highest version they have activated (to go back to "
        "an older version on purpose)",
    )
    deploy.add_argument("--clear", action="store_true", help="remove the pipeline's entry")
    deploy.add_argument("--replace", action="store_true", help="ignore the existing desired state")
    deploy.add_argument(
        "--read-timeout",
        type=float,
        default=1.0,
        help="how long to wait for the existing retained state (default 1 s)",
    )
    deploy.add_argument("--json", action="store_true", help="print one JSON object")
    add_broker_options(deploy)
    deploy.set_defaults(handler=execute_deploy)

    watch = actions.add_parser(
        "watch",
        help="follow a rollout: per device, desired vs running, downloads, failures",
        description="Show, per device, online/offline and per pipeline the desired and "
        "running versions, download progress, validation, activation and failures.",
    )
    watch.add_argument(
        "--device", action="append", default=[], help="a device to watch (repeatable)"
    )
    watch.add_argument("--group", help="use this group's desired state as the baseline")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument(
        "--until-converged",
        action="store_true",
        help="exit 0 when converged, 1 on a failure or at --timeout",
    )
    watch.add_argument(
        "--timeout", type=float, help="seconds (default: none, or 300 with --until-converged)"
    )
    add_broker_options(watch)
    watch.set_defaults(handler=execute_watch)

    dashboard = actions.add_parser(
        "dashboard",
        help="serve the fleet dashboard (a web page) on this workstation",
        description="Serve a web dashboard of the fleet: devices, telemetry, rollouts, "
        "commands and deploys, updated live. Loopback only unless --token-file is given.",
    )
    dashboard.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        help="HOST:PORT to serve on (default 127.0.0.1:8080; port 0 picks a free one); a "
        "non-loopback host needs --token-file",
    )
    dashboard.add_argument(
        "--token-file",
        type=Path,
        help="file whose first line is the login token (at least 16 characters)",
    )
    add_broker_options(dashboard)
    dashboard.set_defaults(handler=execute_dashboard)

    simulate = actions.add_parser(
        "simulate",
        help="run N simulated devices against a broker (load-test a broker and a rollout)",
        description="Start N simulated devices in worker processes. Each runs the agent's "
        "own code (MQTT link with last will and back-off, status, desired and reported "
        "state, signed model delivery, commands, outbox) with a stand-in for inference. "
        "Stop with Ctrl-C or SIGTERM: every device publishes its offline status.",
    )
    simulate.add_argument("--devices", type=int, required=True, help="how many devices")
    simulate.add_argument("--group", help="the devices' group (desired state and commands)")
    simulate.add_argument(
        "--rate", type=float, default=1.0, help="results per second per device (default 1)"
    )
    simulate.add_argument(
        "--id-prefix", default="sim", help="device ids are <prefix>-0001... (default sim)"
    )
    simulate.add_argument(
        "--processes",
        type=int,
        help="worker processes (default: one per 100 devices; at most 110 devices each)",
    )
    simulate.add_argument(
        "--state-dir",
        type=Path,
        help="per-device stores and outboxes (default: a temporary folder removed at exit)",
    )
    simulate.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        help="public key (PEM) that model manifests must be signed with (repeatable)",
    )
    simulate.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept unsigned models (development only; needed when no --trusted-key)",
    )
    simulate.add_argument("--pipeline", default="detect", help="pipeline name (default detect)")
    simulate.add_argument(
        "--model", default="shapes-detector", help="the model it starts with (a bundled name)"
    )
    simulate.add_argument(
        "--probation-s", type=float, default=10.0, help="probation of a new model (default 10)"
    )
    simulate.add_argument(
        "--reconnect-min-s", type=float, default=1.0, help="reconnect back-off floor (default 1)"
    )
    simulate.add_argument(
        "--reconnect-max-s", type=float, default=60.0, help="reconnect back-off cap (default 60)"
    )
    simulate.add_argument(
        "--reconnect-jitter",
        choices=["full", "none"],
        default="full",
        help="full: random waits (default); none: every device waits the same (to compare)",
    )
    simulate.add_argument(
        "--report-every", type=float, default=5.0, help="seconds between summaries (default 5)"
    )
    simulate.add_argument("--duration", type=float, help="stop after this many seconds")
    simulate.add_argument("--json", action="store_true", help="summaries as JSON lines")
    simulate.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="the devices' log level, on stderr (default warning)",
    )
    add_broker_options(simulate)
    simulate.set_defaults(handler=execute_simulate)


def _topics(prefix: str) -> FleetTopics:
    try:
        return FleetTopics(prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def execute_deploy(args: argparse.Namespace) -> int:
    pipeline = check_safe_id(args.pipeline, "pipeline")
    if args.clear:
        if args.model or args.version or args.allow_downgrade:
            raise EdgeAgentError(
                "--clear removes the pipeline's entry: drop --model/--version/--allow-downgrade"
            )
        target = None
    else:
        if not args.model or not args.version:
            raise EdgeAgentError("deploy needs --model and --version (or --clear)")
        target = (check_safe_id(args.model, "name"), check_version(args.version))
    config = broker_config(args)
    try:
        topics = _topics(config.prefix)
        topic = topics.desired(args.device) if args.device else topics.group_desired(args.group)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    with FleetConnection(config, name="deploy") as link:
        existing = None
        if not args.replace:
            raw = link.read_retained(topic, max(args.read_timeout, 0.0))
            existing = parse_desired(raw, topic) if raw is not None else None
        state = merge_desired(
            existing, pipeline, target, by=who(), allow_downgrade=args.allow_downgrade
        )
        link.wait_acked(
            [link.publish(topic, desired_payload(state), retain=True)], stall_timeout=30.0
        )
    if args.json:
        print(json.dumps({"topic": topic, "desired": state}, indent=2))
        return 0
    scope = f"device {args.device}" if args.device else f"group {args.group}"
    if target is None:
        print(f"{scope}: pipeline {pipeline} has no desired model any more ({topic})")
    else:
        previous = existing.pipelines.get(pipeline) if existing is not None else None
        was = ""
        if previous is not None and previous.version:
            was = f" (was {previous.model} {previous.version})"
        downgrade = " (downgrade allowed)" if args.allow_downgrade else ""
        print(f"{scope}: pipeline {pipeline} -> {target[0]} {target[1]}{was}{downgrade} ({topic})")
    others = sorted(p for p in state["pipelines"] if p != pipeline)
    if others:
        print(f"  other pipelines kept: {', '.join(others)}")
    return 0


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from `HOST:PORT` (`[::1]:8080` for IPv6); ConfigError when invalid."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def execute_dashboard(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    try:
        from edgeagent.fleet.dashboard import Dashboard
        from edgeagent.fleet.dashboard.security import check_listen, read_token
    except ImportError as exc:
        raise EdgeAgentError(
            f"the dashboard needs aiohttp ({exc}): pip install 'edgeagent[dashboard]'"
        ) from exc
    host, port = parse_listen(args.listen)
    check_listen(host, "given" if args.token_file else None)  # before reading any file
    token = read_token(args.token_file) if args.token_file else None
    config = broker_config(args)
    _topics(config.prefix)
    dashboard = Dashboard(config, host=host, port=port, token=token)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await dashboard.run(stop, lambda url: print(f"dashboard: {url}", flush=True))

    try:
        asyncio.run(main())
    except OSError as exc:
        raise EdgeAgentError(
            f"cannot serve the dashboard on {args.listen}: {exc.strerror or exc}: choose "
            "another --listen port"
        ) from exc
    return 0


def execute_watch(args: argparse.Namespace) -> int:
    topics = _topics(args.prefix)
    for device in args.device:
        try:
            topics.device_root(device)  # a clear error for an id that cannot be a topic level
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    timeout = args.timeout
    if timeout is None and args.until_converged:
        timeout = 300.0
    if timeout is not None and timeout <= 0:
        raise EdgeAgentError("--timeout must be positive")
    config = broker_config(args)
    rollout = Rollout(config.prefix, args.device, args.group)
    view = _Printer(rollout, as_json=args.json)
    with FleetConnection(config, name="watch") as link:
        link.subscribe(rollout.filters())
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            now = time.monotonic()
            if args.until_converged and now - started >= SETTLE_S:
                verdict = rollout.verdict()
                if verdict.failures:
                    return view.result("failed", verdict.failures, verdict.waiting)
                if verdict.converged:
                    return view.result("converged", (), ())
            if deadline is not None and now >= deadline:
                if not args.until_converged:
                    return 0
                verdict = rollout.verdict()
                return view.result("timeout", verdict.failures, verdict.waiting)
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
            try:
                message = link.messages.get(timeout=wait)
            except queue.Empty:
                continue
            changed, event = rollout.feed(message.topic, message.payload)
            view.show(changed, event)


class _Printer:
    """Writes what changed: a line per device change (human) or JSON lines."""

    def __init__(self, rollout: Rollout, *, as_json: bool) -> None:
        self.rollout = rollout
        self.as_json = as_json
        self._last: dict[str, str] = {}

    def show(self, changed: str | None, event: dict[str, Any] | None) -> None:
        if changed is None:
            return
        names = sorted(self.rollout.devices) if changed == "*" else [changed]
        for name in names:
            if event is not None and not self.as_json:
                print(f"{_clock()} {name} {_event_text(event)}", flush=True)
            state = self.rollout.device_json(name)
            key = json.dumps({k: v for k, v in state.items() if k != "ts"}, sort_keys=True)
            if self._last.get(name) == key:
                continue
            self._last[name] = key
            if self.as_json:
                print(json.dumps(state, sort_keys=True), flush=True)
            else:
                print(f"{_clock()} {_device_text(state)}", flush=True)

    def result(self, outcome: str, failures: Any, waiting: Any) -> int:
        converged = outcome == "converged"
        if self.as_json:
            line = {
                "type": "result",
                "ts": round(time.time(), 3),
                "outcome": outcome,
                "converged": converged,
                "failures": list(failures),
                "waiting": list(waiting),
            }
            print(json.dumps(line, sort_keys=True), flush=True)
        elif converged:
            count = len(self.rollout.devices)
            print(f"converged: {count} device(s) run their desired versions")
        else:
            print(f"not converged ({outcome}):")
            for why in (*failures, *waiting):
                print(f"  {why}")
        return 0 if converged else EXIT_NOT_CONVERGED


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _device_text(state: dict[str, Any]) -> str:
    online = {True: "online", False: "OFFLINE", None: "status unknown"}[state["online"]]
    parts = [f"{state['device']} {online}"]
    for name, p in state["pipelines"].items():
        mark = {"converged": "ok", "failed": "FAILED", "waiting": "..", "unmanaged": "-"}
        parts.append(f"{name} [{mark[p['status']]}] {p['detail']}")
    return "; ".join(parts)


def _event_text(event: dict[str, Any]) -> str:
    what = f"{event.get('pipeline')}: {event.get('type')} {event.get('model', '')} "
    what += str(event.get("version", ""))
    if isinstance(event.get("progress"), int | float):
        what += f" {float(event['progress']):.0%}"
    if event.get("code") or event.get("reason"):
        what += f" ({event.get('code', '')}: {event.get('reason', '')})"
    return what


def execute_simulate(args: argparse.Namespace) -> int:
    from edgeagent.fleet.simulate import (
        MAX_DEVICES_PER_PROCESS,
        SimulationSettings,
        default_processes,
        run_simulation,
    )

    if args.devices < 1:
        raise EdgeAgentError("--devices must be at least 1")
    processes = args.processes or default_processes(args.devices)
    if not 1 <= processes <= args.devices:
        raise EdgeAgentError("--processes must be between 1 and --devices")
    if -(-args.devices // processes) > MAX_DEVICES_PER_PROCESS:
        raise EdgeAgentError(
            f"--processes {processes} puts more than {MAX_DEVICES_PER_PROCESS} devices in one "
            "process: paho waits with select(), which cannot watch a file descriptor numbered "
            "1024 or more, so the devices past that would never connect. Use --processes "
            f"{-(-args.devices // MAX_DEVICES_PER_PROCESS)} or more"
        )
    if args.rate < 0 or (args.duration is not None and args.duration <= 0):
        raise EdgeAgentError("--rate must be 0 or more and --duration positive")
    if not 0 < args.reconnect_min_s <= args.reconnect_max_s:
        raise EdgeAgentError("--reconnect-min-s must be positive and at most --reconnect-max-s")
    if not args.trusted_key and not args.allow_unsigned:
        raise EdgeAgentError(
            "the simulated devices need a key to check model signatures: pass --trusted-key "
            "PUBLIC.pem (see `edgeagent model keygen`), or --allow-unsigned for development"
        )
    for key in args.trusted_key:
        if not key.is_file():
            raise ConfigError(f"--trusted-key {key}: no such file")
    try:
        check_device_id(f"{args.id_prefix}-0001")
        if args.group is not None:
            FleetTopics(args.prefix).group_desired(args.group)
    except ValueError as exc:
        raise ConfigError(f"--id-prefix or --group: {exc}") from exc
    mqtt = broker_config(args).model_copy(
        update={
            "reconnect_min_s": args.reconnect_min_s,
            "reconnect_max_s": args.reconnect_max_s,
            "reconnect_jitter": args.reconnect_jitter,
        }
    )
    state_dir = args.state_dir
    temporary = state_dir is None
    if temporary:
        state_dir = Path(tempfile.mkdtemp(prefix="edgeagent-sim-"))
    try:
        settings = SimulationSettings(
            mqtt=mqtt,
            id_prefix=args.id_prefix,
            group=args.group,
            rate=args.rate,
            pipeline=check_safe_id(args.pipeline, "pipeline"),
            model=args.model,
            state_dir=state_dir.resolve(),
            trusted_keys=tuple(k.resolve() for k in args.trusted_key),
            allow_unsigned=args.allow_unsigned,
            probation_s=args.probation_s,
            log_level=args.log_level,
        )
        return run_simulation(
            settings,
            devices=args.devices,
            processes=processes,
            report_every_s=args.report_every,
            duration_s=args.duration,
            as_json=args.json,
        )
    finally:
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)
