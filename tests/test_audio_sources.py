"""The audio sources: synthetic labelled sounds, WAV replay, and the ALSA microphone (its
device mocked: it is hardware), each cutting windows with hop like the sensor sources."""

from __future__ import annotations

import itertools
import sys
import types
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.config import AlsaMicrophone, SyntheticSounds, WavAudio
from edgeagent.errors import MissingDependencyError, SourceError
from edgeagent.hal.audio.sounds import SOUNDS, SoundGenerator
from edgeagent.hal.audio.synthetic import SyntheticSoundsSource
from edgeagent.hal.audio.windows import SampleWindows
from edgeagent.hal.sources import open_source


def test_windows_overlap_with_a_short_hop_and_skip_with_a_long_one() -> None:
    stream = np.arange(20, dtype=np.float32)
    overlapping = SampleWindows(4, 2)
    overlapping.push(stream)
    assert [w[0].tolist() for w in iter(overlapping.pop, None)][:3] == [
        [0, 1, 2, 3],
        [2, 3, 4, 5],
        [4, 5, 6, 7],
    ]
    skipping = SampleWindows(4, 6)
    for chunk in np.split(stream, 10):  # two samples at a time
        skipping.push(chunk)
    popped = []
    while (window := skipping.pop()) is not None:
        popped.append(window[0].tolist())
    assert popped == [[0, 1, 2, 3], [6, 7, 8, 9], [12, 13, 14, 15]]


def test_synthetic_sounds_are_labelled_windows_with_hop() -> None:
    config = SyntheticSounds(
        type="synthetic-sounds", rate_hz=8000, window=800, hop=400, seed=3, realtime=False
    )
    source = open_source(config)
    try:
        windows = [source.read() for _ in range(12)]
    finally:
        source.close()
    assert all(w.data.shape == (800, 1) and w.data.dtype == np.float32 for w in windows)
    assert all(float(np.abs(w.data).max()) <= 1.0 for w in windows)
    for a, b in itertools.pairwise(windows):
        np.testing.assert_array_equal(a.data[400:], b.data[:400])
    assert {w.truth["sound"] for w in windows if w.truth} <= set(SOUNDS)
    assert [w.sequence for w in windows] == list(range(12))


def test_synthetic_sounds_are_told_apart_by_their_spectrum() -> None:
    """Each class has its physics: a beep's power sits at one frequency, a knock's is low."""
    generator = SoundGenerator(8000, seed=1)
    beep = np.abs(np.fft.rfft(generator.clip("beep", 8000))) ** 2  # 1 Hz per bin
    knock = np.abs(np.fft.rfft(generator.clip("knock", 8000))) ** 2
    assert beep.max() > 1000 * np.median(beep)
    assert knock[:400].sum() / knock.sum() > 0.5
    assert beep[:400].sum() / beep.sum() < 0.05


def test_an_unknown_sound_is_a_clear_error() -> None:
    config = SyntheticSounds(type="synthetic-sounds", sounds=("beep", "moo"))
    with pytest.raises(SourceError, match=r"unknown sound\(s\) \['moo'\]; choose from background"):
        SyntheticSoundsSource(config).open()


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        if width == 2:
            wav.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
        else:
            wav.writeframes(np.round(samples * 127 + 128).astype(np.uint8).tobytes())
    return path


def test_a_wav_file_is_replayed_as_mono_windows(tmp_path: Path) -> None:
    t = np.arange(1000) / 1000
    left, right = np.sin(2 * np.pi * 5 * t) * 0.5, np.zeros(1000)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 1000)
    config = WavAudio(type="wav", path=str(path), window=400, hop=300, realtime=False)
    source = open_source(config)
    try:
        first, second = source.read(), source.read()
        windows = [source.read() for _ in range(3)]  # past the end: loops
    finally:
        source.close()
    expected = np.round(left * 32767) / 32768 / 2  # stereo mixed to mono
    np.testing.assert_allclose(first.data[:, 0], expected[:400], atol=1e-6)
    np.testing.assert_allclose(second.data[:, 0], expected[300:700], atol=1e-6)
    assert all(w.data.shape == (400, 1) for w in windows)


def test_a_wav_source_without_loop_ends_with_a_clear_error(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "short.wav", np.zeros(500), 8000, width=1)
    config = WavAudio(type="wav", path=str(path), window=400, loop=False, realtime=False)
    source = open_source(config)
    source.read()
    with pytest.raises(SourceError, match="exhausted"):
        source.read()
    source.close()


def test_a_file_that_is_not_wav_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "song.mp3"
    path.write_bytes(b"ID3\x03\x00 not a wav")
    with pytest.raises(SourceError, match=r"is not a PCM WAV file .*convert it"):
        open_source(WavAudio(type="wav", path=str(path)))


def test_the_alsa_source_names_its_extra_when_pyalsaaudio_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "alsaaudio", None)  # import fails, as on a bare install
    with pytest.raises(MissingDependencyError, match=r"edgeagent\[audio\]"):
        open_source(AlsaMicrophone(type="alsa"))


class FakePcm:
    """An ALSA capture device: stereo 16-bit periods of a known ramp, then an overrun."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.reads = 0
        self.closed = False

    def read(self) -> tuple[int, bytes]:
        self.reads += 1
        if self.reads == 2:
            return -32, b""  # EPIPE: an overrun
        base = (self.reads - 1) * 4
        left = np.arange(base, base + 4, dtype=np.int16) * 1000
        frames = np.stack([left, left], axis=1)  # same on both channels
        return 4, frames.astype("<i2").tobytes()

    def close(self) -> None:
        self.closed = True


def test_the_alsa_source_mixes_periods_into_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[FakePcm] = []
    fake = types.ModuleType("alsaaudio")
    fake.PCM_CAPTURE, fake.PCM_NORMAL, fake.PCM_FORMAT_S16_LE = 1, 0, 2  # type: ignore[attr-defined]
    fake.ALSAAudioError = OSError  # type: ignore[attr-defined]

    def pcm(**options: Any) -> FakePcm:
        opened.append(FakePcm(**options))
        return opened[-1]

    fake.PCM = pcm  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "alsaaudio", fake)
    config = AlsaMicrophone(type="alsa", rate_hz=8000, channels=2, window=6, hop=4)
    source = open_source(config)
    first, second = source.read(), source.read()
    source.close()
    assert opened[0].options["rate"] == 8000
    assert opened[0].options["channels"] == 2
    assert opened[0].closed
    # Periods 1, 3, 4 (period 2 overran): ramps 0..3, 8..11, 12..15, x 1000 / 32768.
    ramp = np.array([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]) * 1000 / 32768
    np.testing.assert_allclose(first.data[:, 0], ramp[:6], atol=1e-6)
    np.testing.assert_allclose(second.data[:, 0], ramp[4:10], atol=1e-6)


# --- audio classification, end to end ----------------------------------------------------------


def test_infer_classifies_a_wav_file(tmp_path: Path) -> None:
    import json
    import subprocess

    clip = SoundGenerator(8000, seed=77).clip("siren", 8000)
    path = write_wav(tmp_path / "siren.wav", clip, 8000)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeagent.cli.main",
            "infer",
            "sound-classifier",
            str(path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "classification"
    assert report["result"]["classes"][0]["label"] == "siren"


def test_the_daemon_classifies_synthetic_sounds(
    tmp_path: Path, mosquitto: Any, mqtt_reader: Any, agent_process: Any
) -> None:
    import json
    import signal

    import yaml

    config = {
        "device": {"id": "ears"},
        "state_dir": str(tmp_path / "state"),
        "control_socket": str(tmp_path / "control.sock"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "pipelines": [
            {
                "name": "room",
                "source": {"type": "synthetic-sounds", "seed": 5, "realtime": False},
                "model": "sound-classifier",
                "threads": 1,
                "max_fps": 20,
            }
        ],
    }
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    reader = mqtt_reader(mosquitto, "edgeagent/ears/results/room")
    agent = agent_process(config_path)
    try:
        messages = reader.wait_for_count(30, lambda m: True, timeout=90)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    payloads = [json.loads(m.payload) for m in messages[:30]]
    assert all(set(p["result"]) == {"classes"} for p in payloads)
    right = sum(p["result"]["classes"][0]["label"] == p["truth"]["sound"] for p in payloads)
    assert right >= 24, f"{right} of 30 windows classified as the sound they held"
