"""Chunked model transfer: order, duplicates, resuming, corruption, time-outs, a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeagent.delivery.signing import DeliveryError, DeliveryManifest
from edgeagent.delivery.transfer import ChunkAssembler, TransferTimer, staging_dir

CHUNK = 4096


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def manifest_for(data: bytes, chunk_size: int = CHUNK, **changes: object) -> DeliveryManifest:
    fields: dict[str, object] = {
        "name": "digits",
        "version": "2.0.0",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": -(-len(data) // chunk_size),
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
    }
    fields.update(changes)
    return DeliveryManifest.model_validate(fields)


def chunks_of(data: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_in_order_transfer_assembles_the_exact_file(tmp_path: Path) -> None:
    data = payload(10 * CHUNK + 123)
    m = manifest_for(data)
    a = ChunkAssembler(tmp_path, m)
    assert a.missing() == list(range(11))
    assert not a.complete()
    for i, chunk in enumerate(chunks_of(data)):
        assert a.add(i, chunk) is True
        assert a.progress.chunks_have == i + 1
    assert a.complete()
    assert a.bytes_received == len(data)
    assert a.progress.fraction == 1.0
    model = a.assemble()
    assert model.read_bytes() == data
    assert model.parent == staging_dir(tmp_path, m)
    assert files_in(model.parent) == ["manifest.json", "model.tflite"]  # chunks released
    assert a.assemble() == model  # idempotent


def test_out_of_order_and_duplicate_chunks_are_accepted(tmp_path: Path) -> None:
    data = payload(20 * CHUNK + 1)
    parts = chunks_of(data)
    order = list(range(len(parts))) * 2  # every chunk twice
    random.Random(3).shuffle(order)
    a = ChunkAssembler(tmp_path, manifest_for(data))
    fresh = [a.add(i, parts[i]) for i in order]
    assert sum(fresh) == len(parts)  # each stored once, duplicates reported as such
    assert a.assemble().read_bytes() == data


def test_restart_resumes_and_fetches_only_what_is_missing(tmp_path: Path) -> None:
    data = payload(12 * CHUNK)
    parts = chunks_of(data)
    m = manifest_for(data)
    first = ChunkAssembler(tmp_path, m)
    for i in (0, 3, 4, 11):
        first.add(i, parts[i])
    del first  # the agent restarts
    second = ChunkAssembler(tmp_path, m)
    assert second.have() == {0, 3, 4, 11}
    assert second.bytes_received == 4 * CHUNK
    fetched = 0
    for i in second.missing():
        second.add(i, parts[i])
        fetched += len(parts[i])
    assert fetched == len(data) - 4 * CHUNK
    assert second.assemble().read_bytes() == data
    # A restart after assembly needs nothing at all.
    third = ChunkAssembler(tmp_path, m)
    assert third.missing() == []
    assert third.assemble().read_bytes() == data


_RECEIVER = textwrap.dedent(
    """
    import hashlib, random, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from edgeagent.delivery.signing import DeliveryManifest
    from edgeagent.delivery.transfer import ChunkAssembler

    state, size, chunk = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    data = random.Random(11).randbytes(size)
    m = DeliveryManifest(
        name="digits", version="2.0.0", sha256=hashlib.sha256(data).hexdigest(), size=size,
        chunk_size=chunk, chunks=-(-size // chunk), created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    a = ChunkAssembler(state, m)
    print("ready", flush=True)
    for i in range(m.chunks):
        sys.stdin.readline()  # lockstep: the test says when the next chunk may be written
        a.add(i, data[i * chunk : (i + 1) * chunk])
        print(i, flush=True)  # acknowledged: add() returned
    print("done", flush=True)
    """
)


def _next_chunk(receiver: subprocess.Popen[str]) -> None:
    """Lets the receiver write its next chunk."""
    assert receiver.stdin is not None
    receiver.stdin.write("go\n")
    receiver.stdin.flush()


def test_kill_mid_write_loses_at_most_the_chunk_in_flight(tmp_path: Path) -> None:
    size, chunk = 60 * 8192 + 77, 8192
    data = random.Random(11).randbytes(size)
    parts = chunks_of(data, chunk)
    m = manifest_for(data, chunk)
    script = tmp_path / "receiver.py"
    script.write_text(_RECEIVER)
    rng = random.Random(2024)
    for trial in range(4):
        state = tmp_path / f"state{trial}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(state), str(size), str(chunk)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        acked: set[int] = set()
        stop_after = rng.randint(1, 55)
        _next_chunk(proc)
        for line in proc.stdout:
            if line.strip() == "done":
                break
            acked.add(int(line))
            if len(acked) < m.chunks:
                _next_chunk(proc)  # one chunk in flight, and only one, when the kill comes
            if len(acked) >= stop_after:
                time.sleep(rng.uniform(0, 0.003))
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        resumed = ChunkAssembler(state, m)
        have = resumed.have()
        in_flight = max(acked) + 1
        assert acked <= have, "a chunk whose add() returned was lost"
        assert have <= acked | {in_flight}
        refetched = [i for i in resumed.missing() if i in acked or i == in_flight]
        assert len(refetched) <= 1  # at most the chunk that was being written
        assert not [f for f in files_in(resumed.path) if f.startswith(".tmp-")]
        for i in resumed.missing():
            resumed.add(i, parts[i])
        assert resumed.assemble().read_bytes() == data


def test_missing_last_chunk_is_incomplete_then_times_out(tmp_path: Path) -> None:
    data = payload(5 * CHUNK + 10)
    parts = chunks_of(data)
    a = ChunkAssembler(tmp_path, manifest_for(data))
    now = [1000.0]
    timer = TransferTimer(120.0, clock=lambda: now[0])
    for i, part in enumerate(parts[:-1]):
        a.add(i, part)
        now[0] += 5.0
        timer.check(a)  # progress keeps it alive
    assert not a.complete()
    assert a.missing() == [5]
    with pytest.raises(DeliveryError) as caught:
        a.assemble()
    assert caught.value.code == "incomplete"
    now[0] += 119.0
    timer.check(a)
    assert 0 < timer.remaining() <= 1.0
    now[0] += 2.0
    with pytest.raises(DeliveryError) as caught:
        timer.check(a)
    assert caught.value.code == "timeout"
    assert caught.value.details["missing"] == [5]
    assert "(5)" in str(caught.value)
    # The staged chunks survive the time-out: a retry needs only the missing one.
    assert ChunkAssembler(tmp_path, a.manifest).missing() == [5]


def test_timer_does_not_fire_once_complete(tmp_path: Path) -> None:
    data = payload(CHUNK)
    a = ChunkAssembler(tmp_path, manifest_for(data))
    now = [0.0]
    timer = TransferTimer(10.0, clock=lambda: now[0])
    a.add(0, data)
    now[0] = 1e6
    timer.check(a)  # progressed, then complete: never a time-out
    timer.check(a)
    with pytest.raises(ValueError, match="positive"):
        TransferTimer(0)


def test_flipped_bit_is_a_sha256_mismatch_and_the_transfer_restarts(tmp_path: Path) -> None:
    data = payload(8 * CHUNK)
    parts = chunks_of(data)
    a = ChunkAssembler(tmp_path, manifest_for(data))
    bad = bytearray(parts[2])
    bad[100] ^= 0x10
    for i, part in enumerate(parts):
        a.add(i, bytes(bad) if i == 2 else part)
    with pytest.raises(DeliveryError) as caught:
        a.assemble()
    assert caught.value.code == "sha256-mismatch"
    assert a.have() == set()  # which chunk was bad is unknowable: all are discarded
    assert files_in(a.path) == ["manifest.json"]
    for i, part in enumerate(parts):
        a.add(i, part)
    assert a.assemble().read_bytes() == data


def test_wrong_sha256_in_the_manifest_is_refused(tmp_path: Path) -> None:
    data = payload(3 * CHUNK)
    a = ChunkAssembler(tmp_path, manifest_for(data, sha256="0" * 64))
    for i, part in enumerate(chunks_of(data)):
        a.add(i, part)
    with pytest.raises(DeliveryError) as caught:
        a.assemble()
    assert caught.value.code == "sha256-mismatch"
    assert not (a.path / "model.tflite").exists()


def test_wrong_sizes_and_indices_are_refused(tmp_path: Path) -> None:
    data = payload(4 * CHUNK + 100)
    parts = chunks_of(data)
    a = ChunkAssembler(tmp_path, manifest_for(data))
    cases = [
        (0, parts[0][:-1], "bad-chunk"),  # a short chunk that is not the last
        (1, parts[1] + b"x", "bad-chunk"),
        (4, parts[4] + b"more", "size-mismatch"),  # the model is bigger than declared
        (4, parts[4][:50], "size-mismatch"),  # ... or smaller (truncated)
        (5, parts[0], "bad-chunk"),
        (-1, parts[0], "bad-chunk"),
    ]
    for index, chunk, code in cases:
        with pytest.raises(DeliveryError) as caught:
            a.add(index, chunk)
        assert caught.value.code == code, (index, len(chunk))
    assert a.have() == set()
    assert files_in(a.path) == ["manifest.json"]


def test_leftovers_of_a_crash_are_cleaned_on_open(tmp_path: Path) -> None:
    data = payload(3 * CHUNK)
    parts = chunks_of(data)
    m = manifest_for(data)
    a = ChunkAssembler(tmp_path, m)
    a.add(0, parts[0])
    (a.path / ".tmp-chunk-000001-dead").write_bytes(parts[1][:100])  # cut short
    (a.path / "chunk-000002").write_bytes(parts[2][:10])  # impossible length
    b = ChunkAssembler(tmp_path, m)
    assert b.have() == {0}
    assert files_in(b.path) == ["chunk-000000", "manifest.json"]


# --- a disk that fills up -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root or CAP_SYS_ADMIN; skipped, visibly, without)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); see the injected test")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_on_a_real_small_filesystem(small_disk: Path) -> None:
    data = payload(400 * 1024)  # more than the 256 KiB disk
    parts = chunks_of(data, 16 * 1024)
    m = manifest_for(data, 16 * 1024)
    a = ChunkAssembler(small_disk, m)
    failure: DeliveryError | None = None
    for i, part in enumerate(parts):
        try:
            a.add(i, part)
        except DeliveryError as exc:
            failure = exc
            break
    assert failure is not None
    assert failure.code == "disk-full"
    stored = a.have()
    assert 0 < len(stored) < len(parts)
    assert not [f for f in files_in(a.path) if f.startswith(".tmp-")]
    for i in stored:  # what was stored is intact
        assert (a.path / f"chunk-{i:06d}").read_bytes() == parts[i]
    assert ChunkAssembler(small_disk, m).have() == stored  # consistent after a restart
    # More room: the transfer resumes where it stopped, and assembly needs room for a copy.
    subprocess.run(["mount", "-o", "remount,size=600k", str(small_disk)], check=True)
    b = ChunkAssembler(small_disk, m)
    for i in b.missing():
        b.add(i, parts[i])
    with pytest.raises(DeliveryError) as caught:
        b.assemble()  # 400 KiB of chunks + a 400 KiB copy > 600 KiB
    assert caught.value.code == "disk-full"
    assert b.complete()
    assert not (b.path / "model.tflite").exists()
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    assert b.assemble().read_bytes() == data


def test_disk_full_injected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same contract where no tmpfs can be mounted: os.write fails with ENOSPC."""
    data = payload(4 * CHUNK)
    parts = chunks_of(data)
    a = ChunkAssembler(tmp_path, manifest_for(data))
    a.add(0, parts[0])
    real_write = os.write

    def full_disk(fd: int, buf: bytes) -> int:
        real_write(fd, bytes(buf)[:100])  # a partial write first, as a real disk would
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(DeliveryError) as caught:
        a.add(1, parts[1])
    monkeypatch.undo()
    assert caught.value.code == "disk-full"
    assert files_in(a.path) == ["chunk-000000", "manifest.json"]
    assert ChunkAssembler(tmp_path, a.manifest).have() == {0}
