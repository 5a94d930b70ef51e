"""The Coral Edge TPU (USB or PCIe) through libedgetpu's LiteRT external delegate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeagent.hal.accel.base import Probe, ProbeState
from edgeagent.hal.accel.external_delegate import DelegateAccelerator, find_library

LIBRARY_ENV = "EDGEAGENT_EDGETPU_LIB"
LIBRARY = "libedgetpu.so.1"
CUSTOM_OP = "edgetpu-custom-op"
INSTALL_HINT = "install the Edge TPU runtime: apt install libedgetpu1-std from Coral's repository"

# The USB Accelerator enumerates as Global Unichip until the runtime pushes its firmware,
# then re-enumerates as Google.
_USB_IDS = {("1a6e", "089a"): False, ("18d1", "9302"): True}  # -> firmware loaded
_PCI_ID = ("0x1ac1", "0x089a")


@dataclass(frozen=True, slots=True)
class CoralDevice:
    bus: str  # "usb" or "pci"
    where: str  # sysfs directory or /dev/apex_N
    speed_mbps: int | None = None  # USB link speed
    firmware_loaded: bool = True
    driver_loaded: bool = True  # PCIe: whether the apex driver created /dev/apex_N

    def describe(self) -> str:
        if self.bus == "pci":
            if not self.driver_loaded:
                return f"PCIe Coral at {self.where} without the apex driver (/dev/apex_* missing)"
            return f"PCIe Coral {self.where}"
        text = f"USB Coral at {self.where}"
        if self.speed_mbps is not None:
            text += f", {_usb_speed(self.speed_mbps)}"
        if not self.firmware_loaded:
            text += ", firmware not loaded yet (the runtime loads it on first use)"
        return text


class EdgeTpuAccelerator(DelegateAccelerator):
    """Runs Edge TPU compiled models on a Coral. `device` is libedgetpu's device option
    ("usb", "usb:0", "pci:0"); None lets the runtime take the first one it finds."""

    name = "edgetpu"
    what = "Edge TPU"

    def __init__(
        self,
        device: str | None = None,
        *,
        root: Path = Path("/"),
        cache_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        super().__init__(root=root, cache_s=cache_s, clock=clock)

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        if CUSTOM_OP in operator_names:
            return None
        return (
            "model is not compiled for the Edge TPU (no edgetpu-custom-op); "
            "compile it with edgetpu_compiler"
        )

    def find_devices(self) -> list[CoralDevice]:
        """Coral devices on USB (by vendor:product) and PCIe (/dev/apex_N or its PCI id)."""
        devices: list[CoralDevice] = []
        for entry in sorted((self._root / "sys/bus/usb/devices").glob("*")):
            ids = (_read(entry / "idVendor") or "", _read(entry / "idProduct") or "")
            if ids in _USB_IDS:
                speed = _read(entry / "speed")
                devices.append(
                    CoralDevice(
                        "usb",
                        entry.name,
                        speed_mbps=int(float(speed)) if speed else None,
                        firmware_loaded=_USB_IDS[ids],
                    )
                )
        apex = sorted((self._root / "dev").glob("apex_*"))
        devices.extend(CoralDevice("pci", f"/dev/{node.name}") for node in apex)
        if not apex:
            for entry in sorted((self._root / "sys/bus/pci/devices").glob("*")):
                if (_read(entry / "vendor"), _read(entry / "device")) == _PCI_ID:
                    devices.append(CoralDevice("pci", entry.name, driver_loaded=False))
        return devices

    def _options(self) -> dict[str, str] | None:
        return {"device": self.device} if self.device else None

    def _inspect(self) -> Probe:
        devices = self.find_devices()
        details = {"devices": "; ".join(d.describe() for d in devices) or "none"}
        library, how = find_library(LIBRARY_ENV, LIBRARY, "edgetpu")
        if library is None:
            plugged = f"; a Coral is plugged in ({details['devices']})" if devices else ""
            return Probe(
                self.name,
                ProbeState.ABSENT,
                f"Edge TPU runtime not installed: {how}; {INSTALL_HINT}{plugged}",
                details,
            )
        details["library"] = library
        if not devices:
            return Probe(
                self.name,
                ProbeState.ABSENT,
                f"Edge TPU runtime installed ({library}) but no Coral device on USB or PCIe",
                details,
            )
        usable = [d for d in devices if d.driver_loaded]
        if not usable:
            return Probe(
                self.name,
                ProbeState.BROKEN,
                f"{devices[0].describe()}: install gasket-dkms (the apex driver) and reboot",
                details,
            )
        device = usable[0]
        details["device"] = self.device or device.bus
        if device.speed_mbps is not None:
            details["usb_speed"] = _usb_speed(device.speed_mbps)
        return Probe(self.name, ProbeState.PRESENT, f"{device.describe()} via {library}", details)


def _usb_speed(mbps: int) -> str:
    if mbps >= 5000:
        return f"USB3 ({mbps} Mb/s)"
    if mbps == 480:
        return "USB2 (480 Mb/s): slow, plug the Coral into a USB3 (blue) port"
    return f"{mbps} Mb/s: slow, plug the Coral into a USB3 (blue) port"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
