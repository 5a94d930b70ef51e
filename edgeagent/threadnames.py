"""The agent's thread names in the kernel too, so that `top -H`, `ps -L`, /proc/PID/task
and bench/cpu.py tell the threads apart (Python 3.11 names a thread for Python only; the
kernel calls every one of them "python").

The kernel keeps at most 15 bytes of a name: "edgeagent-" is dropped ("p-capture",
"outbox"), "paho-mqtt-client-<id>" becomes "paho-mqtt", and the main thread keeps the
process's name. Linux only; elsewhere, or when /proc is not writable, nothing changes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_KERNEL_NAME_BYTES = 15
_PREFIX = "edgeagent-"


def kernel_name(name: str) -> str:
    """What a Python thread name becomes in the kernel (at most 15 bytes)."""
    if name.startswith("paho-mqtt-client"):
        name = "paho-mqtt"
    name = name.removeprefix(_PREFIX)
    return name.encode()[:_KERNEL_NAME_BYTES].decode(errors="ignore")


def name_kernel_threads() -> None:
    """Gives every live thread of this process but the main one its Python name in the
    kernel (`/proc/self/task/<id>/comm`). Cheap; call it again once new threads run."""
    main = threading.main_thread()
    for thread in threading.enumerate():
        native = thread.native_id
        if thread is main or native is None:
            continue
        try:
            Path(f"/proc/self/task/{native}/comm").write_text(kernel_name(thread.name))
        except OSError as exc:  # not Linux, /proc read-only, or the thread just ended
            log.debug("cannot name thread %s in the kernel: %s", thread.name, exc)
