"""The checks behind `edgeagent doctor`: each returns a verdict and a fix, with its
environment injected (docs/deploy.md)."""
