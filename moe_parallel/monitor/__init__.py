"""Watching runs: per-rank heartbeats and collective tracing, hang watchdog, stragglers, expert
load, and the views over them (status, watch, plot, dashboard)."""
