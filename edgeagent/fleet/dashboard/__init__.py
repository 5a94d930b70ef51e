"""`edgeagent fleet dashboard`: the fleet in a browser (docs/dashboard.md).

`server.Dashboard` serves the pages and pushes changes over a WebSocket; `fleet_state`
folds what devices publish into what the pages show; `bridge` is its MQTT connection
(commands and deploys); `security` decides who may do what. Workstation code: it needs the
`dashboard` extra (aiohttp) and is never imported by the agent.
"""

from edgeagent.fleet.dashboard.server import COMMANDS, Dashboard, DashboardThread

__all__ = ["COMMANDS", "Dashboard", "DashboardThread"]
