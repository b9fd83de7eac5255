"""Goodput at scale: a failure simulator fed by the project's own recovery costs (docs/goodput.md)."""
