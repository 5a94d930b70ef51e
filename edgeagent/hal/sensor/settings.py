"""Sensor backends' settings and facts; light, as `hal/camera/settings.py` says."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from edgeagent.hal.settings import (
    DeviceUse,
    FileReplay,
    Preflight,
    PreflightEnv,
    RealtimeWindows,
    WindowSettings,
    library_preflight,
)

I2C_INSTALL_HINT = "pip install 'edgeagent[i2c]'"
I2C_ENABLE_HINT = "enable I2C with `sudo raspi-config nonint do_i2c 0` (Interface Options > I2C)"
_AXES = 3  # channels of an accelerometer window (x, y, z)


class _Sensor(WindowSettings):
    def sample_shape(self) -> tuple[int, ...]:
        return (self.window, _AXES)


class SyntheticVibration(_Sensor, RealtimeWindows):
    """An accelerometer-like signal with faults that can be injected."""

    implementation: ClassVar[str] = "edgeagent.hal.sensor.synthetic_vibration:SyntheticVibration"

    type: Literal["synthetic-vibration"]
    rate_hz: float = Field(default=1000.0, gt=0)
    window: int = Field(default=256, ge=8)  # samples per window
    hop: int | None = Field(default=None, ge=1)  # samples between windows; default: window
    seed: int = 0
    fault_rate: float = Field(default=0.1, ge=0, le=1)  # fraction of windows with a fault
    realtime: bool = True  # pace windows at rate_hz; false: as fast as read


class CsvSensor(_Sensor, FileReplay):
    """Replays a CSV file, one row per sample, one numeric column per channel."""

    implementation: ClassVar[str] = "edgeagent.hal.sensor.csv:CsvSource"

    type: Literal["csv"]
    path: str
    rate_hz: float = Field(default=100.0, gt=0)
    window: int = Field(default=256, ge=1)
    hop: int | None = Field(default=None, ge=1)
    columns: tuple[str, ...] | None = None  # default: every numeric column
    loop: bool = True

    def sample_shape(self) -> tuple[int, ...]:
        # Without `columns` the file decides; the gate assumes an accelerometer's three.
        return (self.window, len(self.columns) if self.columns else _AXES)


class Mpu6050Sensor(_Sensor):
    """An MPU-6050 accelerometer on the I2C bus via smbus2."""

    implementation: ClassVar[str] = "edgeagent.hal.sensor.mpu6050:Mpu6050Source"

    type: Literal["mpu6050"]
    bus: int = 1
    address: int = 0x68
    rate_hz: float = Field(default=200.0, gt=0, le=1000)
    window: int = Field(default=256, ge=1)
    hop: int | None = Field(default=None, ge=1)

    def device(self) -> DeviceUse | None:
        return DeviceUse("i2c", f"i2c-{self.bus}")

    def preflight(self, env: PreflightEnv) -> Preflight:
        missing = library_preflight("smbus2", "smbus2", I2C_INSTALL_HINT)
        if missing is not None:
            return missing
        if not (env.root / "dev" / f"i2c-{self.bus}").exists():
            fix = (
                f"{I2C_ENABLE_HINT} and reboot" if env.is_raspberry_pi() else "use a board with I2C"
            )
            return Preflight(False, f"/dev/i2c-{self.bus} does not exist", fix)
        return Preflight(True, f"smbus2 imports; /dev/i2c-{self.bus} at 0x{self.address:02x}")
