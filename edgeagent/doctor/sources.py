"""The camera and I2C checks: the devices the enabled pipelines' sources use (as each
source's settings declare them) are there and the service user may open them. Each
source's own pre-flight (camera, I2C, audio) is `SourceSettings.preflight`, run by `pipelines`."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeagent.config import PipelineConfig
from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict
from edgeagent.hal.sensor.settings import I2C_ENABLE_HINT as _I2C_ENABLE
from edgeagent.hal.settings import DeviceFamily, DeviceUse
from edgeagent.hal.settings import importable as _importable

_CAMERA_APPS = ("rpicam-hello", "libcamera-hello")


def _device_users(
    context: CheckContext, family: DeviceFamily
) -> list[tuple[PipelineConfig, DeviceUse]]:
    """The enabled pipelines whose source uses a device of `family`, as its backend says."""
    uses = [(p, p.source.device()) for p in context.pipelines()]
    return [(p, use) for p, use in uses if use is not None and use.family == family]


def _group_members(group: str) -> tuple[bool, set[str]]:
    """(group exists, its members including users whose primary group it is)."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False, set()
    members = set(entry.gr_mem)
    members |= {u.pw_name for u in pwd.getpwall() if u.pw_gid == entry.gr_gid}
    return True, members


def _service_user_in(group: str, env: Environment) -> tuple[str | None, dict[str, Any]]:
    """A warning sentence when the service user exists but is not in `group`."""
    exists, members = _group_members(group)
    try:
        pwd.getpwnam(env.service_user)
    except KeyError:
        return None, {"service_user": f"{env.service_user} (does not exist here)"}
    member = env.service_user in members
    details = {"service_user": env.service_user, f"in_{group}": member}
    if not exists:
        return f"there is no group {group} on this host", details
    if not member:
        return (
            f"the service user {env.service_user} is not in group {group} (the unit's "
            "SupplementaryGroups= grants it under systemd, but not when run by hand)"
        ), details
    return None, details


def _inaccessible(paths: Sequence[Path]) -> list[str]:
    return [str(p) for p in paths if not os.access(p, os.R_OK | os.W_OK)]


def _access_problems(
    paths: Sequence[Path], group: str, env: Environment, details: dict[str, Any]
) -> list[str]:
    """Why the devices at `paths` may not open: this user cannot, or the service user is
    not in `group`; adds what it found to `details`."""
    problems = []
    denied = _inaccessible(paths)
    if denied:
        details["not_accessible"] = denied
        problems.append(f"user {_whoami()} cannot open {', '.join(denied)}")
    warning, user_details = _service_user_in(group, env)
    details.update(user_details)
    if warning:
        problems.append(warning)
    return problems


def check_camera(context: CheckContext) -> list[CheckResult]:
    env = context.env
    video = env.dev("video*")
    media = env.dev("media*")
    apps = {app: env.which(app) for app in _CAMERA_APPS}
    picamera2 = _importable("picamera2")
    uses = _device_users(context, "camera")
    users = [p for p, _use in uses]
    details: dict[str, Any] = {
        "video_devices": [str(p) for p in video],
        "media_devices": [str(p) for p in media],
        "picamera2": picamera2,
        "camera_apps": {k: v for k, v in apps.items() if v},
        "used_by": [p.name for p in users],
    }
    stack = (
        f"libcamera ({', '.join(a for a, p in apps.items() if p)})"
        if any(apps.values())
        else "no libcamera apps"
    )
    summary = (
        f"{len(video)} video and {len(media)} media device(s), {stack}, "
        f"picamera2 {'importable' if picamera2 is True else 'not importable'}"
    )
    critical = bool(users)
    if not video and not media:
        if not users:
            return [
                CheckResult(
                    "camera",
                    Verdict.SKIP,
                    False,
                    "no camera device (/dev/video*, /dev/media*) and no pipeline uses one",
                    None,
                    details,
                )
            ]
        fix = (
            "check the ribbon cable, camera_auto_detect=1 in /boot/firmware/config.txt, "
            "and `rpicam-hello --list-cameras`"
            if env.is_raspberry_pi()
            else "plug in a camera (a USB webcam appears as /dev/video0) or change the pipeline"
        )
        return [
            CheckResult(
                "camera",
                Verdict.FAIL,
                True,
                f"no camera device (/dev/video*, /dev/media*), but pipelines "
                f"{', '.join(p.name for p in users)} need one",
                fix,
                details,
            )
        ]
    problems = _access_problems([*video, *media], "video", env, details)
    lacking = [(p, use.node) for p, use in uses if use.node and not env.dev(use.node)]
    if lacking:
        needs = ", ".join(f"{p.source.type} (pipeline {p.name}) needs /dev/{n}" for p, n in lacking)
        return [
            CheckResult(
                "camera",
                Verdict.FAIL,
                True,
                f"{summary}; {needs} (libcamera's media nodes) and there are none",
                "enable the camera (camera_auto_detect=1 in /boot/firmware/config.txt), "
                "reboot, and check `rpicam-hello --list-cameras`",
                details,
            )
        ]
    if problems:
        return [
            CheckResult(
                "camera",
                Verdict.WARN,
                critical,
                f"{summary}; {'; '.join(problems)}",
                f"add the users to group video (`sudo usermod -aG video {env.service_user}`) "
                "or run doctor as the service user",
                details,
            )
        ]
    return [CheckResult("camera", Verdict.OK, critical, summary, None, details)]


def check_i2c(context: CheckContext) -> list[CheckResult]:
    env = context.env
    buses = env.dev("i2c-*")
    uses = _device_users(context, "i2c")
    users = [p for p, _use in uses]
    on_pi = env.is_raspberry_pi()
    details: dict[str, Any] = {
        "buses": [str(p) for p in buses],
        "raspberry_pi": on_pi,
        "used_by": [p.name for p in users],
    }
    if not users:
        if buses:
            return [
                CheckResult(
                    "i2c",
                    Verdict.OK,
                    False,
                    f"I2C buses {', '.join(details['buses'])}",
                    None,
                    details,
                )
            ]
        where = "I2C is not enabled" if on_pi else "this machine has no I2C bus"
        return [
            CheckResult(
                "i2c",
                Verdict.SKIP,
                False,
                f"{where} (no /dev/i2c-*) and no pipeline uses an I2C sensor",
                f"{_I2C_ENABLE} when you add one" if on_pi else None,
                details,
            )
        ]
    missing = [
        f"/dev/{use.node} (pipeline {p.name})"
        for p, use in uses
        if use.node and not env.dev(use.node)
    ]
    if missing:
        fix = (
            f"{_I2C_ENABLE} and reboot"
            if on_pi
            else "load the i2c-dev kernel module (`sudo modprobe i2c-dev`) on a board with I2C, "
            "or change the pipeline's bus"
        )
        return [
            CheckResult(
                "i2c",
                Verdict.FAIL,
                True,
                f"missing {', '.join(missing)}, needed by the I2C sources",
                fix,
                details,
            )
        ]
    problems = _access_problems(buses, "i2c", env, details)
    if problems:
        return [
            CheckResult(
                "i2c",
                Verdict.WARN,
                True,
                f"I2C buses {', '.join(details['buses'])}; {'; '.join(problems)}",
                f"add the users to group i2c (`sudo usermod -aG i2c {env.service_user}`)",
                details,
            )
        ]
    return [
        CheckResult(
            "i2c", Verdict.OK, True, f"I2C buses {', '.join(details['buses'])}", None, details
        )
    ]


def _whoami() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
