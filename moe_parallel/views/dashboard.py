"""``moectl dashboard``: a small local web page over the registry (standard library http.server,
bound to 127.0.0.1 unless told otherwise).

- ``/``: every run of the registry (``list_runs``) with backend, state, step, loss, tokens/s,
  MFU, restarts, heartbeat age and stragglers, reloaded every ``refresh_s`` seconds; each row
  is ``<tr data-run=NAME data-state=STATE>``, the run's name links to its plots.
- ``/runs/NAME/plots``: the run's PNGs (``moectl plot``), generated on the first request and
  again whenever ``metrics.jsonl`` changed since (cached in ``RUN_DIR/plots``).
- ``/runs/NAME/plots/FILE.png``: one image. ``/api/runs``: the table as JSON.

Only runs of the registry and PNGs the plotter wrote are served: no other file is reachable.
"""

from __future__ import annotations

import html
import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from cluster import RunLayout, list_runs
from moe_parallel.views.plots import PLOTS_DIR, plot_run
from moe_parallel.views.summary import COLUMNS, RunSummary, row, summarize_all

SOURCE_STAMP = "source.json"  # in RUN_DIR/plots: which metrics.jsonl the PNGs were drawn from
_PNG_RE = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


class NotFound(Exception):
    pass


class Dashboard:
    def __init__(self, root: Path | None, refresh_s: int = 5, peak_tflops: float | None = None):
        self.root, self.refresh_s, self.peak_tflops = root, refresh_s, peak_tflops
        self._plot_lock = threading.Lock()

    # ------------------------------------------------------------------------------ pages
    def index(self) -> str:
        summaries = summarize_all(self.root, self.peak_tflops)
        rows = "\n".join(self._row_html(s) for s in summaries)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        empty = (
            ""
            if summaries
            else f"<p id='empty'>no runs under {html.escape(str(self._root_text()))}</p>"
        )
        return _page(
            "moe-parallel runs",
            f"""
<h1>moe-parallel runs</h1>
<p class="meta">registry: {html.escape(self._root_text())} &middot; {len(summaries)} run(s)
&middot; reloads every {self.refresh_s} s</p>
{empty}
<table id="runs"><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table>""",
            refresh_s=self.refresh_s,
        )

    def _row_html(self, s: RunSummary) -> str:
        cells = row(s)
        name = html.escape(s.name)
        cells_html = [f'<td class="run"><a href="/runs/{name}/plots">{name}</a></td>']
        for column, text in zip(COLUMNS[1:], cells[1:]):
            cls = (
                "state state-" + html.escape(s.status)
                if column == "status"
                else re.sub(r"[^a-z]", "", column.lower())
            )
            cells_html.append(f'<td class="{cls}">{html.escape(text)}</td>')
        return (
            f'<tr data-run="{name}" data-state="{html.escape(s.status)}" '
            f'data-backend="{html.escape(s.backend)}">{"".join(cells_html)}</tr>'
        )

    def plots_page(self, name: str) -> str:
        run_dir = self._run_dir(name)
        try:
            pngs = self.plots(run_dir)
        except ValueError as exc:  # no step records yet: say so on the page
            return _page(
                f"{name}: plots",
                f"<h1>{html.escape(name)}</h1>"
                f"<p class='error'>{html.escape(str(exc))}</p>"
                "<p><a href='/'>all runs</a></p>",
                refresh_s=self.refresh_s,
            )
        images = "\n".join(
            f'<figure><img src="/runs/{html.escape(name)}/plots/{p.name}" '
            f'alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>'
            for p in pngs
        )
        return _page(
            f"{name}: plots",
            f"<h1>{html.escape(name)}</h1><p><a href='/'>all runs</a></p>\n{images}",
        )

    def plots(self, run_dir: Path) -> list[Path]:
        """The run's PNGs, drawn again when metrics.jsonl changed since the last drawing."""
        out = run_dir / PLOTS_DIR
        metrics = RunLayout(run_dir).metrics
        if not metrics.is_file():
            raise ValueError(f"{metrics} does not exist yet: nothing to plot")
        source = {"size": metrics.stat().st_size, "mtime_ns": metrics.stat().st_mtime_ns}
        stamp = out / SOURCE_STAMP
        with self._plot_lock:
            cached = json.loads(stamp.read_text()) if stamp.is_file() else {}
            if cached.get("source") == source and all((out / f).is_file() for f in cached["files"]):
                return [out / f for f in cached["files"]]
            pngs = plot_run(run_dir, out)
            stamp.write_text(json.dumps({"source": source, "files": [p.name for p in pngs]}))
            return pngs

    def png(self, name: str, filename: str) -> bytes:
        run_dir = self._run_dir(name)
        if not _PNG_RE.match(filename):
            raise NotFound(f"not a plot name: {filename!r}")
        path = run_dir / PLOTS_DIR / filename
        if not path.is_file():
            raise NotFound(f"no plot {filename} for run {name} (open /runs/{name}/plots first)")
        return path.read_bytes()

    def runs_json(self) -> str:
        return json.dumps(
            [dict(zip(COLUMNS, row(s))) for s in summarize_all(self.root, self.peak_tflops)]
        )

    # ---------------------------------------------------------------------------- helpers
    def _run_dir(self, name: str) -> Path:
        for entry in list_runs(self.root):
            if entry.path.name == name:
                return entry.path
        raise NotFound(f"no run named {name!r} in the registry {self._root_text()}")

    def _root_text(self) -> str:
        from cluster.registry import runs_root

        return str(runs_root(self.root).resolve())


def _page(title: str, body: str, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{refresh}<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; }}
th {{ background: #eee; }} .meta {{ color: #666; }} .error {{ color: #b00; }}
.state-running {{ color: #070; }} .state-failed {{ color: #b00; font-weight: bold; }}
.state-completed {{ color: #035; }} .state-pending, .state-requeued {{ color: #a60; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 640px; }}
</style></head><body>
{body}
</body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard  # set on the subclass made by make_server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = unquote(self.path.split("?", 1)[0])
        parts = [p for p in path.split("/") if p]
        try:
            if not parts:
                self._send(self.dashboard.index(), "text/html; charset=utf-8")
            elif parts == ["api", "runs"]:
                self._send(self.dashboard.runs_json(), "application/json")
            elif len(parts) == 3 and parts[0] == "runs" and parts[2] == "plots":
                self._send(self.dashboard.plots_page(parts[1]), "text/html; charset=utf-8")
            elif len(parts) == 4 and parts[0] == "runs" and parts[2] == "plots":
                self._send(self.dashboard.png(parts[1], parts[3]), "image/png")
            else:
                raise NotFound(f"no page {path}")
        except NotFound as exc:
            self._send(
                _page("not found", f"<p class='error'>{html.escape(str(exc))}</p>"),
                "text/html; charset=utf-8",
                HTTPStatus.NOT_FOUND,
            )

    def _send(self, body: str | bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def make_server(
    root: Path | None,
    port: int = 8470,
    host: str = "127.0.0.1",
    refresh_s: int = 5,
    peak_tflops: float | None = None,
) -> ThreadingHTTPServer:
    handler = type(
        "DashboardHandler", (_Handler,), {"dashboard": Dashboard(root, refresh_s, peak_tflops)}
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(
    root: Path | None,
    port: int,
    host: str = "127.0.0.1",
    refresh_s: int = 5,
    peak_tflops: float | None = None,
) -> int:
    server = make_server(root, port, host, refresh_s, peak_tflops)
    print(f"dashboard: http://{host}:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
