"""The `edgeagent` command line."""
