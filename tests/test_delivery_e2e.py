"""Model delivery as an operator lives it: `edgeagent model keygen|publish` and `edgeagent
fleet deploy|watch` run as subprocesses against a real mosquitto, the device is `edgeagent
run` as a subprocess, and the only things read are what the fleet can see (results,
`reported`, events, command replies, exit codes) plus, after a kill -9, the device's model
store on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edgeagent.delivery.store import ModelStore
from edgeagent.inference import Engine
from tests.broker import Mosquitto, MqttReader, Received, body
from tests.delivery_e2e import (
    BUNDLED,
    DELIVERY_STEPS,
    DETECTOR,
    MODEL,
    SSD,
    TOPIC,
    VIBRATION,
    Agent,
    command,
    deploy,
    event,
    fresh_results,
    is_delivery_event,
    keygen,
    nan_model,
    on,
    publish,
    results,
    retained_report,
    steps_of,
    tool,
    version_of,
    watch_until_converged,
    write_config,
)
from tests.waiting import wait_until

# --- 1. the whole life of a version --------------------------------------------------------


def test_publish_deploy_activate_reject_and_rollback(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agents: Callable[[Path], Agent],
) -> None:
    key, public = keygen(tmp_path / "keys")
    # The new model's p95 invoke latency is judged against the old one's; both detectors
    # take ~0.15 ms, where scheduler noise on a shared 2-core box exceeds 3x, so the
    # latency check is kept out of the way: probation here is decided by NaN outputs.
    config = write_config(
        tmp_path,
        mosquitto,
        public,
        probation_s=3,
        probation_min_results=10,
        chunk_timeout_s=10,
        latency_factor=50,
    )
    reader = mqtt_reader(mosquitto, f"{TOPIC}/#")
    agent = agents(config)
    reader.wait_for(lambda m: m.topic.endswith("/results/shapes"), timeout=30)
    assert {version_of(r) for r in results(reader)} == {"1.0.0"}, "the bundled model runs first"

    # a. Publish, deploy, watch it converge.
    publish(mosquitto, key, SSD, "2.0.0", BUNDLED / "shapes-detector-ssd.yaml", 16384)
    since = len(reader.messages)
    deploy(mosquitto, "2.0.0")
    watched = watch_until_converged(mosquitto, 90)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "converged" in watched.stdout
    assert steps_of(reader, "2.0.0", since) == list(DELIVERY_STEPS)
    report = retained_report(mosquitto, mqtt_reader)
    assert (report["model"], report["version"], report["state"]) == (MODEL, "2.0.0", "running")
    assert report["staged"] is None
    swapped = fresh_results(reader, 5)
    assert {version_of(r) for r in swapped} == {"2.0.0"}
    assert all(r["result"]["detections"] is not None for r in swapped)
    seen = results(reader)
    assert [r["seq"] for r in seen] == list(range(len(seen))), "no result lost in the swap"
    assert [version_of(r) for r in seen] == sorted(version_of(r) for r in seen), (
        "1.0.0 until the swap, 2.0.0 after it"
    )

    # b. A bad version. The publisher refuses a file that is not a TFLite model at all...
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(random.Random(3).randbytes(40_000))
    refused = tool(
        "model", "publish", str(junk), "--name", MODEL, "--version", "3.0.0",
        "--key", str(key), *on(mosquitto),
    )  # fmt: skip
    assert refused.returncode != 0
    assert "not a TFLite model" in refused.stderr
    # ...so a bad version that reaches a device is a real model that cannot run there: the
    # vibration model takes sensor windows, not camera frames. The device's gate refuses it.
    publish(mosquitto, key, VIBRATION, "3.0.0", BUNDLED / "vibration-anomaly.yaml", 16384)
    since = len(reader.messages)
    deploy(mosquitto, "3.0.0")
    rejected = event(reader, "rejected", "3.0.0", since)
    assert rejected["code"] == "input-mismatch"
    assert "window" in rejected["reason"]
    assert steps_of(reader, "3.0.0", since) == ["downloaded", "rejected"]
    watched = watch_until_converged(mosquitto, 60)
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "not converged (failed)" in watched.stdout
    assert "input-mismatch" in watched.stdout
    report = retained_report(mosquitto, mqtt_reader)
    assert report["version"] == "2.0.0", "the rejection never touched the running model"
    assert report["last_failure"]["version"] == "3.0.0"
    assert report["last_failure"]["code"] == "input-mismatch"
    assert report["last_failure"]["reason"]
    after = fresh_results(reader, 10)
    assert {version_of(r) for r in after} == {"2.0.0"}

    # c. A version that passes the gate but gives NaN in service is rolled back by itself.
    model, manifest = nan_model(tmp_path)
    publish(mosquitto, key, model, "4.0.0", manifest, 16384)
    since = len(reader.messages)
    deploy(mosquitto, "4.0.0")
    rolled = event(reader, "rolled-back", "4.0.0", since)
    assert rolled["code"] == "probation-failed"
    assert "non-finite" in rolled["reason"]
    assert "rolled back to 2.0.0" in rolled["reason"]
    assert steps_of(reader, "4.0.0", since) == [
        "downloaded",
        "validated",
        "activated",
        "rolled-back",
    ]
    ran = [r for r in results(reader, since) if version_of(r) == "4.0.0"]
    assert ran, "4.0.0 did run before it was rolled back"
    assert all(r.get("non_finite") for r in ran)
    back = fresh_results(reader, 10)
    assert {version_of(r) for r in back} == {"2.0.0"}
    report = retained_report(mosquitto, mqtt_reader)
    assert (report["version"], report["state"]) == ("2.0.0", "running")
    assert report["last_failure"]["version"] == "4.0.0"
    assert report["last_failure"]["code"] == "probation-failed"

    # d. Rollback on command. 2.0.0 is the first version delivered and the bundled model
    # is not in the store, so there is nothing to roll back to yet, and the reply says so.
    nothing = command(mosquitto, reader, "model.rollback", {"pipeline": "shapes"})
    assert nothing["stage"] == "failed"
    assert "no previous version" in nothing["reason"]
    # With 2.1.0 delivered over it, rolling back returns to 2.0.0 without a download.
    publish(mosquitto, key, DETECTOR, "2.1.0", BUNDLED / "shapes-detector.yaml", 16384)
    deploy(mosquitto, "2.1.0")
    watched = watch_until_converged(mosquitto, 90)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    since = len(reader.messages)
    done = command(mosquitto, reader, "model.rollback", {"pipeline": "shapes"})
    assert done["stage"] == "succeeded", done
    assert done["result"] == {"pipeline": "shapes", "version": "2.0.0"}
    assert "downloaded" not in steps_of(reader, "2.0.0", since)
    report = retained_report(mosquitto, mqtt_reader)
    assert (report["version"], report["state"]) == ("2.0.0", "running")
    assert report["last_failure"]["version"] == "2.1.0"
    assert report["last_failure"]["code"] == "rolled-back"
    back = fresh_results(reader, 10)
    assert {version_of(r) for r in back} == {"2.0.0"}

    # e. A clean stop, and every result of this run arrived in order, without a gap.
    assert agent.stop() == 0, agent.stderr()
    assert "Traceback" not in agent.stderr()
    reader.wait_for(
        lambda m: m.topic == f"{TOPIC}/status" and body(m)["state"] == "offline", timeout=10
    )
    seen = results(reader)
    assert [r["seq"] for r in seen] == list(range(len(seen)))
    assert len({r["run"] for r in seen}) == 1


# --- 2. kill -9 at any moment of a delivery ------------------------------------------------

KEEP = 1  # old versions are pruned, so that going back to one means downloading it again
QUOTA = 64 << 20
CHUNK = 4096  # the smallest devices take: ~48 chunks per version, a download to cut
PROBATION_S = 1.5
# Deployed in turn. With KEEP = 1 a version is pruned two activations after its own, so
# with five in rotation most deployments download, and a cut download resumes later.
VERSIONS = [
    (f"2.{minor}.0", *variant)
    for minor, variant in enumerate(
        [
            (SSD, BUNDLED / "shapes-detector-ssd.yaml"),
            (DETECTOR, BUNDLED / "shapes-detector.yaml"),
        ]
        * 3
    )
][:5]
PUBLISHED = {v: hashlib.sha256(path.read_bytes()).hexdigest() for v, path, _ in VERSIONS}


def phase_at_kill(messages: list[Received]) -> str:
    """How far this run's delivery got, from what it published before it died: startup
    (no transfer began), download, gate (downloaded: validating and installing), probation
    (activated: the new model runs, the pointer has not moved), converged, or failed."""
    phase = "startup"
    steps = {
        "download-progress": "download",
        "downloaded": "gate",
        "validated": "gate",
        "activated": "probation",
        "probation-passed": "converged",
        "rejected": "failed",
        "rolled-back": "failed",
    }
    for message in messages:
        if is_delivery_event(message):
            phase = steps[body(message)["type"]]
        elif message.topic == f"{TOPIC}/reported" and phase == "startup":
            staged = body(message)["pipelines"].get("shapes", {}).get("staged")
            if staged is not None and staged["progress"] < 1:
                phase = "download"
    return phase


def wait_quietly(reader: MqttReader, since: int, kinds: set[str], timeout: float) -> bool:
    """True once this run published one of the delivery steps `kinds` (or, for download,
    a reported transfer in progress); False after `timeout` (the step may never come)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in reader.messages[since:]:
            if is_delivery_event(message) and body(message)["type"] in kinds:
                return True
            if "download" in kinds and message.topic == f"{TOPIC}/reported":
                staged = body(message)["pipelines"].get("shapes", {}).get("staged")
                if staged is not None and staged["progress"] < 1:
                    return True
        time.sleep(0.01)
    return False


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.add(int(stat.parent.name))
    return found


def ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie of whoever adopted it has ended


def check_store(root: Path) -> tuple[str | None, set[str]]:
    """Opens the store as the agent does after a crash; (the active version or None when the
    bundled model runs, the installed versions). Fails unless the invariant held without
    any repair: the pointer names a complete version whose file hashes to its manifest and
    loads in LiteRT."""
    as_left = ModelStore(root, keep=KEEP, quota_bytes=QUOTA, repair=False)
    damage = [
        p
        for p in as_left.verify_integrity()
        if not Path(p.split(": ", 1)[0]).name.startswith((".tmp-", ".trash-"))
    ]
    assert damage == [], "only debris of interrupted operations may be left"
    store = ModelStore(root, keep=KEEP, quota_bytes=QUOTA, repair=True)
    store.clean_debris()
    assert store.verify_integrity() == []
    installed = {stored.version for stored in store.versions(MODEL)}
    active = store.active(MODEL)
    if active is None:
        return None, installed
    assert hashlib.sha256(active.path.read_bytes()).hexdigest() == active.manifest.sha256
    assert PUBLISHED[active.version] == active.manifest.sha256
    Engine.load(active.path, accelerator="cpu").close()
    return active.version, installed


def test_kill_9_during_download_and_activation_always_restarts_into_a_working_model(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mqtt_reader: Callable[..., MqttReader],
    agents: Callable[[Path], Agent],
) -> None:
    key, public = keygen(tmp_path / "keys")
    for version, model, manifest in VERSIONS:
        publish(mosquitto, key, model, version, manifest, CHUNK)
    config = write_config(
        tmp_path,
        mosquitto,
        public,
        keep=KEEP,
        quota_bytes=QUOTA,
        probation_s=PROBATION_S,
        probation_min_results=5,
        chunk_timeout_s=10,
        latency_factor=50,  # only a kill may end a probation here
    )
    store_root = tmp_path / "state" / "models"
    reader = mqtt_reader(mosquitto, f"{TOPIC}/#")
    rng = random.Random(20251126)
    # Where each kill is aimed: anywhere in [0.2, 4] s after the start, or a random moment
    # shortly after the run reports a download, a finished download (the gate runs, then
    # the install) or an activation (probation). What the run really reached before it died
    # is then read from what it published.
    aims = {
        "anytime": (set(), (0.2, 4.0)),
        "download": ({"download"}, (0.0, 0.25)),
        "gate": ({"downloaded"}, (0.0, 0.4)),
        "probation": ({"activated"}, (0.0, PROBATION_S)),
    }
    plan = ["anytime"] * 6 + ["download"] * 6 + ["gate"] * 5 + ["probation"] * 5
    rng.shuffle(plan)
    order = [version for version, _, _ in VERSIONS]
    phases: Counter[str] = Counter()
    actives: Counter[str | None] = Counter()
    orphans: set[int] = set()
    installed: set[str] = set()
    target = order[-1]
    for aim in plan:
        # Each trial deploys the next version in turn; one aimed at a download skips the
        # versions the device still has (they would be activated from the store).
        turn = order[order.index(target) + 1 :] + order[: order.index(target) + 1]
        missing = [v for v in turn if v not in installed]
        target = missing[0] if aim == "download" and missing else turn[0]
        deploy(mosquitto, target, allow_downgrade=True)  # round the versions: 2.4.0, 2.0.0
        kinds, (low, high) = aims[aim]
        since = len(reader.messages)
        agent = agents(config)
        if kinds:
            wait_quietly(reader, since, kinds, timeout=4)
        time.sleep(rng.uniform(low, high))
        orphans |= children_of(agent.process.pid)  # a gate in progress outlives the agent
        agent.process.kill()
        agent.process.wait(10)
        time.sleep(0.1)  # what it sent before dying is still on its way from the broker
        phases[phase_at_kill(reader.messages[since:])] += 1
        active, installed = check_store(store_root)
        actives[active] += 1

    distribution = (
        f"kill phases {dict(phases)}; active after the kill {dict(actives)}; "
        f"{len(orphans)} gate(s) orphaned"
    )
    print(distribution)
    assert phases["download"] >= 3, distribution
    assert phases["gate"] + phases["probation"] >= 3, distribution
    wait_until(
        lambda: all(ended(pid) for pid in orphans),
        30,
        "every gate orphaned by a kill to end on its own",
        interval=0.1,
    )

    # A clean start on whatever the kills left runs a working model and converges on the
    # last desired version. Unless the kills struck that version's probation twice in a
    # row: then the agent refuses it (so that a model that kills the agent in probation
    # cannot do so forever) and stays on the active version.
    marker = store_root / "delivery" / "shapes.probation.json"
    left = json.loads(marker.read_text()) if marker.exists() else {}
    refused = left.get("version") == target and left.get("attempts", 0) >= 2
    running = (check_store(store_root)[0] or "1.0.0") if refused else target
    since = len(reader.messages)
    agent = agents(config)
    if refused:
        rejected = event(reader, "rejected", target, since)
        assert rejected["code"] == "probation-failed"
        assert "agent-restart" in rejected["reason"]
    else:
        watched = watch_until_converged(mosquitto, 60)
        assert watched.returncode == 0, watched.stdout + watched.stderr + agent.stderr()
    run = wait_until(
        lambda: next(
            (
                body(m)["run"]
                for m in reader.messages[since:]
                if m.topic == f"{TOPIC}/status" and body(m)["state"] == "online"
            ),
            None,
        ),
        30,
        "the restarted agent is online",
    )
    wait_until(
        lambda: (
            len([r for r in results(reader, since) if (r["run"], version_of(r)) == (run, running)])
            >= 5
        ),
        30,
        f"results of {running} from the restarted agent",
    )
    assert agent.stop() == 0
    assert "Traceback" not in agent.stderr()
    assert check_store(store_root)[0] == (None if running == "1.0.0" else running)
    assert refused or not marker.exists(), "no probation left open"
