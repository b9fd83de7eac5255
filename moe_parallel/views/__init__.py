"""Views over runs on disk (state.json, metrics.jsonl, heartbeats, run_info.json): the table of
``moectl status``, the live ``moectl watch``, the PNGs of ``moectl plot`` and the local web page
of ``moectl dashboard``. They only read run directories (and, for SLURM and Ray runs, ask the
scheduler through the backend's refresh, as ``moectl status`` does)."""
