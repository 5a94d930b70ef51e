"""The clock and TLS certificate checks: the clock is plausible and synchronised, and the
configured CA and client certificates parse and are valid now."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeagent.config import MqttConfig
from edgeagent.doctor.base import CheckContext, CheckResult, Environment, Verdict

EARLIEST_PLAUSIBLE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
"""A clock before this is wrong (a Pi without an RTC boots at its last saved time or 1970)."""


def _tls_files(mqtt: MqttConfig) -> list[tuple[str, Path]]:
    if mqtt.tls is None:
        return []
    return [
        (role, path)
        for role, path in (("ca_file", mqtt.tls.ca_file), ("cert_file", mqtt.tls.cert_file))
        if path is not None
    ]


def _load_certificates(path: Path) -> list[Any]:
    """Every certificate in a PEM (or DER) file; ValueError/OSError when none parse."""
    from cryptography import x509

    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_der_x509_certificate(data)]


def check_clock(context: CheckContext) -> list[CheckResult]:
    env = context.env
    now = env.now()
    tls = context.config is not None and context.config.mqtt.tls is not None
    details: dict[str, Any] = {"now": now.isoformat(timespec="seconds")}
    ntp = env.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    synced = {"yes": True, "no": False}.get((ntp or "").strip())
    details["ntp_synchronized"] = synced
    if now < EARLIEST_PLAUSIBLE_TIME:
        return [
            CheckResult(
                "clock",
                Verdict.FAIL,
                tls,
                f"the system clock says {now:%Y-%m-%d %H:%M} UTC, before this agent was "
                "released: certificates are not yet valid and timestamps are wrong",
                "enable time sync (`sudo timedatectl set-ntp true`, systemd-timesyncd) and "
                "let it reach an NTP server; a Pi has no RTC unless you add one",
                details,
            )
        ]
    behind = []
    if context.config is not None:
        for role, path in _tls_files(context.config.mqtt):
            with contextlib.suppress(OSError, ValueError):
                for cert in _load_certificates(path):
                    if cert.not_valid_before_utc > now:
                        behind.append(
                            f"{role} {path} (valid from {cert.not_valid_before_utc:%Y-%m-%d})"
                        )
    if behind:
        return [
            CheckResult(
                "clock",
                Verdict.FAIL,
                True,
                f"the clock ({now:%Y-%m-%d %H:%M} UTC) is before the start of "
                f"{'; '.join(behind)}: the clock is behind or the certificate is from the future",
                "sync the clock (`sudo timedatectl set-ntp true`) and check its date",
                details,
            )
        ]
    if synced is False:
        return [
            CheckResult(
                "clock",
                Verdict.WARN,
                tls,
                f"the clock says {now:%Y-%m-%d %H:%M} UTC but is not NTP-synchronized",
                "enable time sync: `sudo timedatectl set-ntp true`",
                details,
            )
        ]
    sync_text = "NTP-synchronized" if synced else "NTP state unknown (timedatectl did not answer)"
    return [
        CheckResult(
            "clock", Verdict.OK, tls, f"{now:%Y-%m-%d %H:%M} UTC, {sync_text}", None, details
        )
    ]


def check_certificates(context: CheckContext) -> list[CheckResult]:
    if context.config is None or context.config.mqtt.tls is None:
        why = context.config_note or "mqtt.tls is not set (plain TCP)"
        return [CheckResult("tls.certificates", Verdict.SKIP, False, f"{why}: nothing to check")]
    return [certificate_result(context.config.mqtt, context.env)]


def certificate_result(mqtt: MqttConfig, env: Environment) -> CheckResult:
    """Whether the configured CA and client certificates parse and are valid now."""
    now = env.now()
    tls = mqtt.tls
    assert tls is not None
    files = _tls_files(mqtt)
    failures: list[str] = []
    warnings: list[str] = []
    certs: list[dict[str, Any]] = []
    if tls.key_file is not None and not os.access(tls.key_file, os.R_OK):
        failures.append(f"key_file {tls.key_file} is missing or unreadable")
    for role, path in files:
        try:
            loaded = _load_certificates(path)
        except OSError as exc:
            failures.append(f"{role} {path} cannot be read ({exc.strerror})")
            continue
        except ValueError as exc:
            failures.append(f"{role} {path} is not a PEM or DER certificate ({exc})")
            continue
        for cert in loaded:
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            subject = cert.subject.rfc4514_string() or "(no subject)"
            certs.append(
                {
                    "file": str(path),
                    "role": role,
                    "subject": subject,
                    "not_before": start.isoformat(),
                    "not_after": end.isoformat(),
                }
            )
            label = f"{role} {path} ({subject})"
            if end < now:
                failures.append(f"{label} expired on {end:%Y-%m-%d}")
            elif start > now:
                failures.append(f"{label} is not valid before {start:%Y-%m-%d %H:%M} UTC")
            elif end - now < env.expiry_warning:
                warnings.append(f"{label} expires on {end:%Y-%m-%d}, in {(end - now).days} days")
    details: dict[str, Any] = {"certificates": certs}
    if tls.ca_file is None:
        details["ca"] = "system trust store"
    if failures:
        return CheckResult(
            "tls.certificates",
            Verdict.FAIL,
            True,
            "; ".join(failures),
            "install current certificates (and check the clock if one is 'not valid before')",
            details,
        )
    if warnings:
        return CheckResult(
            "tls.certificates",
            Verdict.WARN,
            True,
            "; ".join(warnings),
            "renew the certificate before it expires",
            details,
        )
    if not certs:
        return CheckResult(
            "tls.certificates",
            Verdict.OK,
            True,
            "no certificate files configured; the broker is checked against the system trust store",
            None,
            details,
        )
    latest = min(c["not_after"] for c in certs)[:10]
    return CheckResult(
        "tls.certificates",
        Verdict.OK,
        True,
        f"{len(certs)} certificate(s) valid, the first to expire on {latest}",
        None,
        details,
    )
