"""Events, not floods: what a pipeline publishes of its results (docs/protocol.md).

`settings` holds the `publish:` section (a configuration leaf: pydantic only);
`policy.make_policy` builds the runtime side: per-frame results (`every`), aggregates
(`interval`), changes (`change`) or tracked-object events (`events`), plus the retained
per-pipeline summary. `tracking` wraps the tracker library (norfair), `zones` the
polygons, `snapshots` the best JPEG per tracked object.
"""
