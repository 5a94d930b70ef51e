"""The checks behind `edgeagent doctor`: each returns a verdict and a fix, with its
environment injected (docs/deploy.md).

Each check answers one question (is the broker reachable? can the camera be opened?)
with a `CheckResult`: a verdict (`ok`, `warn`, `fail`, `skip`), one sentence saying what
was found, one saying what to do when the verdict is not `ok`, and machine-readable
details. A check is *critical* when the agent cannot do its job if it fails (the
configuration, the broker, a pipeline's model or source); a failed non-critical check
(an absent Coral when `accelerator: auto` falls back to the CPU) is reported but does not
make the device unhealthy.

`run_checks(config_path)` (`runner`) runs them all, in a fixed order, and never raises: a
check that cannot run reports why. What the checks read from the machine (`/dev`, `/sys`,
`/proc`, commands on PATH, the clock, the accelerator probes) comes through `Environment`
(`base`) so that tests can relocate or replace it. One module per check family: `config`,
`runtime` (Python, LiteRT), `accelerators` (incl. the Edge TPU runtime), `sources` (camera,
I2C), `tls` (clock, certificates), `broker`, `storage` (disk, model store), `pipelines`
(each pipeline's model and source).
"""

from edgeagent.doctor.accelerators import accelerator_result, edgetpu_runtime_result
from edgeagent.doctor.base import CheckResult, Environment, Verdict, healthy, machine_summary
from edgeagent.doctor.broker import broker_mqtt_result, broker_tcp_result
from edgeagent.doctor.pipelines import pipeline_model_result, pipeline_source_result
from edgeagent.doctor.runner import run_checks
from edgeagent.doctor.runtime import check_litert, check_python
from edgeagent.doctor.storage import disk_result, model_store_result
from edgeagent.doctor.tls import certificate_result

__all__ = [
    "CheckResult",
    "Environment",
    "Verdict",
    "accelerator_result",
    "broker_mqtt_result",
    "broker_tcp_result",
    "certificate_result",
    "check_litert",
    "check_python",
    "disk_result",
    "edgetpu_runtime_result",
    "healthy",
    "machine_summary",
    "model_store_result",
    "pipeline_model_result",
    "pipeline_source_result",
    "run_checks",
]
