"""Serving: greedy generation, dynamic vs static gating, routing traces (issue #10)."""
