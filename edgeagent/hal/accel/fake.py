"""An honest fake accelerator for tests: it loads, breaks and disappears like a Coral does.

While present, `delegates()` returns [] so models really run (on the CPU kernels) and
results are real. It is not in the registry; tests construct it directly.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from edgeagent.errors import AcceleratorError
from edgeagent.hal.accel.base import Probe, ProbeState

logger = logging.getLogger(__name__)


class FakeAccelerator:
    """A fake in one of the three probe states, changeable at run time.

    `fail_on_load` keeps the probe PRESENT but makes `delegates()` fail, as a delegate that
    probed fine and then cannot be created (device busy, stale probe cache) does.
    `required_op` makes `can_run` refuse models without that custom operator.
    """

    def __init__(
        self,
        name: str = "fake-tpu",
        state: ProbeState = ProbeState.PRESENT,
        *,
        fail_on_load: bool = False,
        reason: str | None = None,
        required_op: str | None = None,
    ) -> None:
        self.name = name
        self.fail_on_load = fail_on_load
        self.required_op = required_op
        self.loads = 0  # successful delegates() calls
        self._lock = threading.Lock()
        self._state = state
        self._reason = reason or _default_reason(state)

    def probe(self) -> Probe:
        with self._lock:
            return Probe(self.name, self._state, self._reason, {"fake": "true"})

    def present(self) -> bool:
        with self._lock:
            return self._state is ProbeState.PRESENT

    def delegates(self) -> list[Any]:
        with self._lock:
            if self._state is ProbeState.ABSENT:
                raise AcceleratorError(f"{self.name} is absent: {self._reason}")
            if self._state is ProbeState.BROKEN or self.fail_on_load:
                raise AcceleratorError(
                    f"{self.name} is present but broken: Failed to load delegate from "
                    f"lib{self.name}.so ({self._reason})"
                )
            self.loads += 1
        return []

    def can_run(self, operator_names: frozenset[str]) -> str | None:
        if self.required_op is None or self.required_op in operator_names:
            return None
        return f"model is not compiled for {self.name} (no {self.required_op})"

    def unplug(self) -> None:
        """From now on probe() is ABSENT and delegates() raises, like a Coral pulled out."""
        self._set(ProbeState.ABSENT, "device was unplugged; no device on USB or PCIe")

    def plug_in(self) -> None:
        """Present and loading again."""
        self.fail_on_load = False
        self._set(ProbeState.PRESENT, _default_reason(ProbeState.PRESENT))

    def break_(self, reason: str = "device stopped responding") -> None:
        """From now on probe() is BROKEN with `reason` and delegates() raises."""
        self._set(ProbeState.BROKEN, reason)

    def _set(self, state: ProbeState, reason: str) -> None:
        with self._lock:
            self._state = state
            self._reason = reason
        logger.info("%s is now %s: %s", self.name, state, reason)


def _default_reason(state: ProbeState) -> str:
    return {
        ProbeState.PRESENT: "fake accelerator (runs on the CPU kernels)",
        ProbeState.ABSENT: "fake accelerator not plugged in",
        ProbeState.BROKEN: "fake accelerator fails to load",
    }[state]
