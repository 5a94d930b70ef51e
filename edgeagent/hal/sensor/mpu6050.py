"""An MPU-6050 accelerometer on the I2C bus (smbus2), sampled in a background thread."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgeagent.errors import MissingDependencyError, SourceError
from edgeagent.hal.sensor.settings import I2C_INSTALL_HINT, Mpu6050Sensor
from edgeagent.hal.settings import SampleKind
from edgeagent.hal.source import Sample

logger = logging.getLogger(__name__)


# Register map (MPU-6000/6050 Register Map and Descriptions, rev 4.2).
SMPLRT_DIV = 0x19
CONFIG = 0x1A  # DLPF_CFG in bits 2:0
ACCEL_CONFIG = 0x1C  # AFS_SEL in bits 4:3
ACCEL_XOUT_H = 0x3B  # X, Y, Z as big-endian int16 through 0x40
PWR_MGMT_1 = 0x6B
WHO_AM_I = 0x75
WHO_AM_I_VALUE = 0x68
LSB_PER_G = 16384.0  # at AFS_SEL=0, +-2 g

# DLPF_CFG -> accelerometer bandwidth in Hz; any of 1..6 makes the sample clock 1 kHz.
_DLPF_BANDWIDTH = {1: 184, 2: 94, 3: 44, 4: 21, 5: 10, 6: 5}
_BASE_RATE_HZ = 1000.0


class SMBusLike(Protocol):
    """The part of smbus2.SMBus the driver uses (a fake bus implements the same)."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> Sequence[int]: ...

    def close(self) -> None: ...


BusFactory = Callable[[int], SMBusLike]


def open_smbus(bus: int) -> SMBusLike:
    """The real bus /dev/i2c-`bus` through smbus2."""
    try:
        from smbus2 import SMBus
    except ImportError as exc:
        raise MissingDependencyError("smbus2", I2C_INSTALL_HINT) from exc
    device = Path(f"/dev/i2c-{bus}")
    if not device.exists():
        raise SourceError(f"mpu6050 source: {_no_bus(bus)}")
    try:
        smbus: SMBusLike = SMBus(bus)
    except PermissionError as exc:
        raise SourceError(
            f"mpu6050 source: no permission to open {device}; add this user to the i2c group"
        ) from exc
    return smbus


def rate_registers(rate_hz: float) -> tuple[int, int, float]:
    """(SMPLRT_DIV, DLPF_CFG, actual rate) for the nearest rate the chip can do, with the
    widest low-pass filter that still stays below the Nyquist frequency."""
    divider = min(255, max(0, round(_BASE_RATE_HZ / rate_hz) - 1))
    actual = _BASE_RATE_HZ / (divider + 1)
    dlpf = next((cfg for cfg, bw in _DLPF_BANDWIDTH.items() if bw <= actual / 2), 6)
    return divider, dlpf, actual


class Mpu6050Source:
    """Windows of `window` (x, y, z) accelerations in g, every `hop` samples.

    A thread reads the chip at `rate_hz` into a ring buffer; read() blocks until the next
    window is complete. A reader that falls behind the ring skips to the newest window.
    """

    kind: SampleKind = "window"

    def __init__(
        self,
        config: Mpu6050Sensor,
        *,
        bus_factory: BusFactory = open_smbus,
        error_timeout_s: float = 1.0,
    ) -> None:
        self.config = config
        self.window = config.window
        self.hop = config.hop_samples
        self.error_timeout_s = error_timeout_s
        self._bus_factory = bus_factory
        self._bus: SMBusLike | None = None
        self._capacity = max(2 * (self.window + self.hop), int(config.rate_hz * 2))
        self._ring = np.zeros((self._capacity, 3), dtype=np.float32)
        self._count = 0  # samples written since open
        self._next_end = self.window  # sample count at which the next window is complete
        self._sequence = 0
        self._error: SourceError | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rate_hz = config.rate_hz

    def open(self) -> None:
        try:
            bus = self._bus_factory(self.config.bus)
        except FileNotFoundError as exc:
            raise SourceError(f"mpu6050 source: {_no_bus(self.config.bus)}") from exc
        self._bus = bus
        try:
            self._configure(bus)
        except OSError as exc:
            self.close()
            raise SourceError(f"mpu6050 source: {_bus_error(exc, self._where)}") from exc
        except SourceError:
            self.close()
            raise
        if self.rate_hz != self.config.rate_hz:
            logger.info(
                "mpu6050: %g Hz is not a chip rate; using %g Hz", self.config.rate_hz, self.rate_hz
            )
        self._count = 0
        self._next_end = self.window
        self._sequence = 0
        self._error = None
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._sample_loop, name="edgeagent-mpu6050", daemon=True
        )
        self._thread.start()
        logger.info("mpu6050 source: %s at %g Hz", self._where, self.rate_hz)

    @property
    def _where(self) -> str:
        return f"0x{self.config.address:02x} on /dev/i2c-{self.config.bus}"

    def _configure(self, bus: SMBusLike) -> None:
        """Checks the chip is an MPU-6050, wakes it and sets +-2 g and the sample rate."""
        address = self.config.address
        identity = bus.read_byte_data(address, WHO_AM_I)
        if identity != WHO_AM_I_VALUE:
            raise SourceError(
                f"mpu6050 source: the device at {self._where} answers WHO_AM_I="
                f"0x{identity:02x}, not 0x{WHO_AM_I_VALUE:02x}: it is not an MPU-6050 "
                "(check the address)"
            )
        divider, dlpf, self.rate_hz = rate_registers(self.config.rate_hz)
        bus.write_byte_data(address, PWR_MGMT_1, 0x00)  # wake from sleep, internal clock
        time.sleep(0.001)
        bus.write_byte_data(address, ACCEL_CONFIG, 0x00)  # +-2 g
        bus.write_byte_data(address, CONFIG, dlpf)
        bus.write_byte_data(address, SMPLRT_DIV, divider)

    def read(self) -> Sample:
        started = time.monotonic()
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._thread is None:
                    raise SourceError("mpu6050 source: read() before open() or after close()")
                if self._count - (self._next_end - self.window) > self._capacity:
                    skipped = self._count - self._next_end
                    self._next_end = self._count  # fell behind the ring: newest window
                    logger.warning(
                        "mpu6050 source: reader fell behind, skipped %d samples", skipped
                    )
                if self._count >= self._next_end:
                    break
                self._cond.wait(timeout=0.5)
            end = self._next_end
            indices = np.arange(end - self.window, end) % self._capacity
            window = self._ring[indices].copy()
            self._next_end += self.hop
        sequence = self._sequence
        self._sequence += 1
        return Sample(
            window, captured_at=time.time(), capture_s=time.monotonic() - started, sequence=sequence
        )

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
        with self._cond:
            self._cond.notify_all()
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.close()

    def read_acceleration(self) -> npt.NDArray[np.float32]:
        """One (x, y, z) sample in g, read in one block so the axes belong together."""
        bus = self._bus
        if bus is None:
            raise SourceError("mpu6050 source: not open")
        raw = bytes(bus.read_i2c_block_data(self.config.address, ACCEL_XOUT_H, 6))
        counts = np.frombuffer(raw, dtype=">i2").astype(np.float32)
        result: npt.NDArray[np.float32] = counts / np.float32(LSB_PER_G)
        return result

    def _sample_loop(self) -> None:
        period = 1.0 / self.rate_hz
        where = self._where
        next_due = time.monotonic()
        failing_since: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if next_due > now:
                self._stop.wait(next_due - now)
                continue
            next_due = max(next_due + period, now - period)  # no catch-up burst
            try:
                sample = self.read_acceleration()
            except OSError as exc:
                failing_since = failing_since or now
                if now - failing_since < self.error_timeout_s:
                    logger.debug("mpu6050 source: read failed, retrying: %s", exc)
                    continue
                with self._cond:
                    self._error = SourceError(f"mpu6050 source: {_bus_error(exc, where)}")
                    self._cond.notify_all()
                return
            failing_since = None
            with self._cond:
                self._ring[self._count % self._capacity] = sample
                self._count += 1
                if self._count >= self._next_end:
                    self._cond.notify_all()


def _bus_error(exc: OSError, where: str) -> str:
    if exc.errno in (errno.EREMOTEIO, errno.ENXIO):
        return (
            f"no device answers at {where} ({exc.strerror or exc}); check the wiring and the "
            "address (0x68 with AD0 low, 0x69 with AD0 high); `i2cdetect -y BUS` lists devices"
        )
    return f"I2C error talking to {where}: {exc}"


def _no_bus(bus: int) -> str:
    return (
        f"/dev/i2c-{bus} does not exist; enable I2C with raspi-config "
        "(Interface Options > I2C) or dtparam=i2c_arm=on in config.txt, then reboot"
    )
