"""A real two-node Ray cluster on this machine, for tests and for users trying the Ray backend.

``start()`` builds:

* a bridge ``br-moeray`` (10.78.0.1/24) in the root network namespace and one network namespace
  ``moe-ray1`` joined to it by a veth pair (outer end ``veth-moeray1`` on the bridge, inner end
  ``ray0`` with 10.78.0.11/24, plus ``lo`` up): a simulated second host;
* the Ray head in the root namespace on the bridge address (GCS on 10.78.0.1:6390, 2 CPUs,
  resource ``moe_head``), with the dashboard, and with it the Jobs API, on http://127.0.0.1:8265;
* a Ray worker node inside ``moe-ray1`` (10.78.0.11, 2 CPUs, resource ``moe_worker``), started
  with ``nsenter --net`` (as the SLURM nodes are; ``ip netns exec`` would also give it a private
  mount namespace with a remounted /sys).  It registers with the GCS at 10.78.0.1:6390 through the
  bridge.  The dashboard listens on the root namespace's loopback only, so it is NOT reachable from
  inside ``moe-ray1``; nothing there needs it (job submission goes to the head).
* token authentication (``RAY_AUTH_MODE=token``): a random token is written once to
  /var/lib/moe-parallel/ray-local/auth_token and given to every ``ray start`` by
  ``RAY_AUTH_TOKEN_PATH``; clients need the same two variables, see ``RayClusterInfo.env()``.

Every process of the cluster carries ``MOE_PARALLEL_RAY_LOCAL`` in its environment (inherited from
``ray start`` by the GCS, raylets, dashboard, workers and job drivers).  ``stop()`` ends exactly
those processes and the namespace's processes, NOT every Ray process of the machine as
``ray stop`` does (the process table is shared by the namespaces, so ``ray stop``, even run inside
``moe-ray1``, would also kill the head and any other Ray instance on the machine, e.g. a test's
``ray.init()``).  The measured recipe and its traps are in /work/shared/notes/local-slurm-and-ray.md.

gloo across the two nodes needs ``GLOO_SOCKET_IFNAME`` set to the interface holding the node's
address (``cluster.netif.interface_for_address``): the hostname resolves to 127.0.0.1 in both
namespaces, and rank 0 would otherwise advertise a loopback address.

Ray's own logs: /tmp/ray/session_latest/logs (both nodes share the session directory; the worker
node's files carry its own names, e.g. raylet.<n>.out); output of the ``ray start`` commands:
/var/lib/moe-parallel/ray-local/logs.

Test infrastructure (see ``cluster.testbed``): needs root, not shipped with the wheel.

CLI: ``python -m cluster.testbed.ray start [--timeout S]``, ``stop``, ``status``, ``env``,
``stop-worker``, ``start-worker``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster.procs import descendants, is_gone
from cluster.testbed import common
from cluster.testbed.common import JsonRecord, LocalClusterError, ReentrantLock

__all__ = [
    "RayClusterInfo",
    "RayLocalError",
    "main",
    "running",
    "start",
    "start_worker_node",
    "stop",
    "stop_worker_node",
]

STATE_DIR = Path("/var/lib/moe-parallel/ray-local")
TOKEN_PATH = STATE_DIR / "auth_token"
LOCK_PATH = STATE_DIR / "lock"  # serializes start/stop between processes (two test sessions)
LOG_DIR = STATE_DIR / "logs"  # output of our `ray start` commands
RAY_TEMP = Path("/tmp/ray")  # Ray's default temp dir; both nodes share it (one file system)
RAY_LOGS = RAY_TEMP / "session_latest" / "logs"
RAY_CURRENT_CLUSTER = RAY_TEMP / "ray_current_cluster"  # written by `ray start --head`

BRIDGE = "br-moeray"
SUBNET = "10.78.0"
HEAD_IP = f"{SUBNET}.1"
WORKER_IP = f"{SUBNET}.11"
NETNS = "moe-ray1"
NETNS_PATH = common.netns_path(NETNS)
# Not "moe-ray1-br": cluster/testbed/slurm.py deletes every root-namespace link named moe-*-br.
OUTER_IF = "veth-moeray1"
INNER_IF = "ray0"

GCS_PORT = 6390
DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8265
CPUS_PER_NODE = 2
HEAD_RESOURCE = "moe_head"
WORKER_RESOURCE = "moe_worker"
# Two nodes share this machine's RAM (/dev/shm); Ray's default object store is 30 % of it per node.
OBJECT_STORE_BYTES = 2 * 1024**3

MARKER_ENV = "MOE_PARALLEL_RAY_LOCAL"  # value "head" or "worker": which node a process belongs to

HTTP_TIMEOUT_S = 5
LOG_TAIL_LINES = 20
LOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class RayClusterInfo(JsonRecord):
    """What a driver or job client needs to know about the running local cluster."""

    gcs_address: str
    dashboard_url: str
    token_path: str
    head_ip: str
    worker_ip: str
    worker_netns: str
    bridge: str
    cpus_per_node: int
    head_resource: str
    worker_resource: str

    def env(self) -> dict[str, str]:
        """Environment variables for a driver (``ray.init()``) or a Jobs API client
        (``JobSubmissionClient()``, ``ray job submit``) of this cluster.

        ``RAY_API_SERVER_ADDRESS`` is set too: the Jobs API clients prefer it over ``RAY_ADDRESS``
        (which overrides even an explicit address argument) and so talk to the dashboard directly
        instead of looking its address up in the GCS."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }


class RayLocalError(LocalClusterError):
    """The local Ray cluster could not be started or stopped (details in the message)."""


def _info() -> RayClusterInfo:
    """The (fixed) description of the cluster this module builds."""
    return RayClusterInfo(
        gcs_address=f"{HEAD_IP}:{GCS_PORT}",
        dashboard_url=f"http://{DASHBOARD_HOST}:{DASHBOARD_PORT}",
        token_path=str(TOKEN_PATH),
        head_ip=HEAD_IP,
        worker_ip=WORKER_IP,
        worker_netns=NETNS,
        bridge=BRIDGE,
        cpus_per_node=CPUS_PER_NODE,
        head_resource=HEAD_RESOURCE,
        worker_resource=WORKER_RESOURCE,
    )


# Serializes start/stop between processes (two test sessions); start() calls stop() under it.
_locked = ReentrantLock(LOCK_PATH, LOCK_TIMEOUT_S, "starting or stopping the local Ray cluster")


# --------------------------------------------------------------------------- commands


def _ray_exe() -> str:
    """The `ray` CLI of the Python running this module (so the nodes run the same Ray)."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise RayLocalError(
            f"the `ray` command is missing (not beside {sys.executable}, not on PATH): "
            "pip install 'ray[default]'"
        )
    return found


def _ray_env(node: str) -> dict[str, str]:
    """Environment of a `ray start`: token auth, our marker, no usage-stats reporting (there is
    no internet here), and none of the caller's Ray addresses or tokens that could redirect it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    }
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(TOKEN_PATH),
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER_ENV: node,
        }
    )
    return env


def _ray_start(
    node: str,
    node_ip: str,
    resource: str,
    options: list[str],
    deadline: float,
    prefix: tuple[str, ...] = (),
) -> None:
    """Run the `ray start` of one node (``options`` make it the head or a worker), with its CPUs,
    its resource and its object store; its output goes to LOG_DIR/<node>.start.out (the daemons
    it leaves behind inherit its stdout)."""
    args = [
        *prefix,
        _ray_exe(),
        "start",
        *options,
        "--node-ip-address",
        node_ip,
        "--num-cpus",
        str(CPUS_PER_NODE),
        "--resources",
        json.dumps({resource: 1}),
        "--object-store-memory",
        str(OBJECT_STORE_BYTES),
        "--disable-usage-stats",
    ]
    common.start_detached(
        args,
        f"the Ray {node}",
        LOG_DIR / f"{node}.start.out",
        timeout=max(deadline - time.monotonic(), 10),
        env=_ray_env(node),
        logs=_log_tails,
    )


def _log_tails() -> str:
    """Tails of the logs that say why a node did not come up: our `ray start` outputs and Ray's
    own GCS, raylet and dashboard logs (non-empty ones) of the latest session."""
    paths = [LOG_DIR / "head.start.out", LOG_DIR / "worker.start.out"]
    if RAY_LOGS.is_dir():
        logs = RAY_LOGS.resolve()  # name the session in the message, not "session_latest"
        for pattern in (
            "gcs_server*.err",
            "gcs_server*.out",
            "raylet*.err",
            "raylet*.out",
            "dashboard.err",
            "dashboard.log",
            "dashboard_agent*.log",
            "runtime_env_agent*.err",
            "monitor.err",
        ):
            paths += sorted(logs.glob(pattern))
    else:
        paths.append(RAY_LOGS)
    shown = [
        common.tail(p, LOG_TAIL_LINES) for p in paths if not p.is_file() or p.stat().st_size > 0
    ]
    return "\n".join(shown)


# --------------------------------------------------------------------------- token


def ensure_token() -> Path:
    """Create the cluster's auth token once (kept across stop/start so that clients holding the
    path keep working).  `ray get-auth-token --generate` cannot do this: in Ray 2.60 it always
    writes ~/.ray/auth_token.  The token is Ray's own format (secrets.token_hex(32))."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_DIR.chmod(0o700)
    if TOKEN_PATH.is_file() and TOKEN_PATH.read_text().strip():
        return TOKEN_PATH
    tmp = TOKEN_PATH.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.replace(tmp, TOKEN_PATH)
    return TOKEN_PATH


def _token() -> str:
    try:
        return TOKEN_PATH.read_text().strip()
    except FileNotFoundError as exc:
        raise RayLocalError(
            f"the cluster's auth token {TOKEN_PATH} is missing; run start()"
        ) from exc


# --------------------------------------------------------------------------- network


def _netns_ready() -> bool:
    """Whether the namespace exists with its inner interface carrying the worker's address."""
    if not NETNS_PATH.exists():
        return False
    done = common.run(["ip", "-n", NETNS, "-o", "-4", "addr", "show", "dev", INNER_IF], check=False)
    return done.returncode == 0 and f" {WORKER_IP}/" in done.stdout


def _ensure_network() -> None:
    """Bridge in the root namespace and the worker's namespace joined to it; parts that exist and
    are complete are kept (the head binds to the bridge address, so it must not be recreated
    under a running head)."""
    common.require_tools("ip", "nsenter", purpose="the local Ray cluster")
    if not common.link_exists(BRIDGE):
        common.add_bridge(BRIDGE, HEAD_IP)
    if _netns_ready():
        return
    if NETNS_PATH.exists():  # half built: build it again
        common.run(["ip", "netns", "del", NETNS])
    if common.link_exists(OUTER_IF):
        common.run(["ip", "link", "del", OUTER_IF])
    common.add_netns_host(NETNS, WORKER_IP, BRIDGE, OUTER_IF, INNER_IF)


def _teardown_network() -> list[str]:
    """Delete the namespace, the veth and the bridge, whichever exist; returns the errors met."""
    return common.teardown_network([NETNS], [OUTER_IF], BRIDGE)


def _check_gcs_reachable_from_netns(timeout: float = 5) -> None:
    """A TCP connection from inside the namespace to the head's GCS, before the worker's
    `ray start` (whose own error would be a long wait and a vague message)."""
    probe = f"import socket; socket.create_connection(({HEAD_IP!r}, {GCS_PORT}), timeout={timeout}).close()"
    done = common.run(
        [*common.nsenter_net(NETNS), sys.executable, "-c", probe], timeout=timeout + 10, check=False
    )
    if done.returncode != 0:
        raise RayLocalError(
            f"the head's GCS {HEAD_IP}:{GCS_PORT} is not reachable from namespace {NETNS}: "
            f"{done.stderr.strip()[-1000:]}"
        )


# --------------------------------------------------------------------------- processes


def _marked_pids(node: str | None = None) -> list[int]:
    """Processes started by our `ray start`, of one node or of both: those with the marker in
    their environment and all their descendants.  The descendants are needed because Ray's
    workers, agents and dashboard modules rename themselves (setproctitle: "ray::IDLE",
    "ray::DashboardAgent"), which overwrites what /proc/PID/environ shows; they are children of
    the raylet or dashboard, which keep the marker readable.  Processes gone or unreadable while
    scanning are skipped."""
    pids: set[int] = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            value = proc.environ().get(MARKER_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone, a kernel thread, or a zombie: nothing to stop
        if value is None or (node is not None and value != node):
            continue
        pids.add(proc.info["pid"])
        pids.update(child.pid for child in descendants([proc.info["pid"]]))
    pids.discard(os.getpid())
    return sorted(pids)


def _kill_until_gone(find_pids: Callable[[], list[int]], what: str, timeout_s: float) -> None:
    """SIGKILL the processes ``find_pids()`` names, again and again until it names none: a raylet
    or dashboard met in the middle of a start may spawn children while we kill.  SIGKILL, not
    SIGTERM: Ray 2.60's gcs_server, raylet, log monitor and runtime-env agent were still alive
    10 s after a SIGTERM here (`ray stop --force` also sends SIGKILL)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = find_pids()
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RayLocalError(f"{what} still alive {timeout_s:.0f} s after SIGKILL: {pids}")
        common.kill(pids)


def _port_owners(port: int) -> list[str]:
    """Processes listening on a TCP port of the root namespace, as "name (pid N)"."""
    owners = []
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == port
            and conn.pid
        ):
            try:
                owners.append(f"{psutil.Process(conn.pid).name()} (pid {conn.pid})")
            except psutil.NoSuchProcess:
                continue
    return owners


# --------------------------------------------------------------------------- cluster state


def _http_get(path: str, what: str, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, str]:
    """GET from the dashboard with the cluster's token; returns (HTTP status, body).  When the
    dashboard does not answer, raises RayLocalError saying that ``what`` does not answer."""
    req = urllib.request.Request(f"http://{DASHBOARD_HOST}:{DASHBOARD_PORT}{path}")
    req.add_header("Authorization", f"Bearer {_token()}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise RayLocalError(
            f"{what} at http://{DASHBOARD_HOST}:{DASHBOARD_PORT} does not answer: {exc}"
        ) from exc


def _nodes() -> list[dict]:
    """Every node the GCS knows (alive and dead), through the dashboard's state API (what
    `ray list nodes` reads).  Raises RayLocalError when the dashboard does not answer properly."""
    status, body = _http_get("/api/v0/nodes?limit=1000&detail=true", "the dashboard")
    if status != 200:
        raise RayLocalError(f"GET /api/v0/nodes answered HTTP {status}: {body[:500]}")
    try:
        return json.loads(body)["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RayLocalError(
            f"GET /api/v0/nodes answered unexpected JSON ({exc!r}): {body[:500]}"
        ) from exc


def _alive(
    nodes: list[dict], ip: str, resource: str, exclude: frozenset[str] = frozenset()
) -> dict | None:
    """The alive node at ``ip`` with ``resource`` and all its CPUs, if any, ignoring the node ids
    in ``exclude``."""
    for node in nodes:
        res = node.get("resources_total") or {}
        if (
            node.get("state") == "ALIVE"
            and node.get("node_ip") == ip
            and res.get(resource, 0) >= 1
            and res.get("CPU") == CPUS_PER_NODE
            and node.get("node_id") not in exclude
        ):
            return node
    return None


def _alive_ids(nodes: list[dict], ip: str) -> frozenset[str]:
    """Ids of the nodes at ``ip`` the GCS still counts as alive."""
    return frozenset(
        n.get("node_id") for n in nodes if n.get("state") == "ALIVE" and n.get("node_ip") == ip
    )


def _has_process(pids: list[int], name: str) -> bool:
    """Whether one of the processes is alive (not a zombie) and named ``name``."""
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.name() == name and not is_gone(proc):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def _worker_processes_up() -> bool:
    """Whether the worker node's raylet runs in the namespace.  The GCS notices a killed node
    only after its health checks fail (about 10-15 s here), so until then its view alone would
    call a lost node alive."""
    return _has_process(common.netns_pids(NETNS), "raylet")


def _head_processes_up() -> bool:
    """Whether the head's GCS server and raylet run (processes of ours outside the namespace)."""
    pids = sorted(set(_marked_pids("head")) - set(common.netns_pids(NETNS)))
    return _has_process(pids, "gcs_server") and _has_process(pids, "raylet")


def _describe(nodes: list[dict]) -> str:
    """One line per node for error messages."""
    if not nodes:
        return "(no nodes)"
    return "\n".join(
        f"{n.get('node_ip')} {n.get('state')} head={n.get('is_head_node')} "
        f"resources={n.get('resources_total')}"
        for n in nodes
    )


def _jobs_api_answers() -> None:
    """The Jobs API (what JobSubmissionClient.list_jobs calls) answers with the token; raises."""
    status, body = _http_get("/api/jobs/", "the Jobs API")
    try:
        jobs = json.loads(body)
    except ValueError:
        jobs = None
    if status != 200 or not isinstance(jobs, list):
        raise RayLocalError(f"GET /api/jobs/ with the token answered HTTP {status}: {body[:500]}")


def _wait(what: str, ready: Callable[[], bool], deadline: float) -> None:
    """Poll ``ready()`` (returns True, or raises LocalClusterError meaning "not yet") until the
    deadline; on timeout raise with the last reason and the Ray log tails."""
    last = "never checked"
    while True:
        try:
            if ready():
                return
            last = "not ready"
        except LocalClusterError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise RayLocalError(
                f"local Ray cluster: {what} not reached in time; last check: {last}\n{_log_tails()}"
            )
        time.sleep(0.5)


def _head_up() -> bool:
    """Whether the head's processes run, the GCS counts it alive and the Jobs API answers;
    raises with the reason when not."""
    if not _head_processes_up():
        raise RayLocalError("the head's gcs_server or raylet process is not running")
    nodes = _nodes()
    if _alive(nodes, HEAD_IP, HEAD_RESOURCE) is None:
        raise RayLocalError(f"the head node is not alive yet; nodes:\n{_describe(nodes)}")
    _jobs_api_answers()
    return True


def _worker_up(exclude: frozenset[str] = frozenset()) -> bool:
    """Whether the worker's raylet runs and the GCS counts a worker node (not one of the node ids
    in ``exclude``) alive; raises with the reason when not."""
    if not _worker_processes_up():
        raise RayLocalError(f"no raylet runs in namespace {NETNS}")
    nodes = _nodes()
    if _alive(nodes, WORKER_IP, WORKER_RESOURCE, exclude) is None:
        raise RayLocalError(f"the worker node is not alive yet; nodes:\n{_describe(nodes)}")
    return True


# --------------------------------------------------------------------------- public API


def running() -> RayClusterInfo | None:
    """The cluster's info when its network exists, the dashboard answers and both nodes are alive
    (head with moe_head at 10.78.0.1, worker with moe_worker at 10.78.0.11, 2 CPUs each); else None."""
    if not (common.link_exists(BRIDGE) and _netns_ready() and TOKEN_PATH.is_file()):
        return None
    if not (_head_processes_up() and _worker_processes_up()):
        return None
    try:
        nodes = _nodes()
    except LocalClusterError:
        return None  # the dashboard does not answer: not (fully) running
    if (
        _alive(nodes, HEAD_IP, HEAD_RESOURCE) is None
        or _alive(nodes, WORKER_IP, WORKER_RESOURCE) is None
    ):
        return None
    return _info()


def _check_can_run() -> None:
    if os.geteuid() != 0:
        raise RayLocalError(
            "the local Ray cluster needs root (network namespaces, a bridge, /var/lib)"
        )
    _ray_exe()


@_locked
def start(timeout_s: float = 90) -> RayClusterInfo:
    """Start the local two-node Ray cluster (see the module doc) and wait until both nodes are
    alive with their CPUs and the Jobs API answers with the token.

    Idempotent: a running cluster is returned as is; when only the worker node is lost (head
    healthy) only the worker is started again.  Anything else of ours (a half-failed start) is
    stopped first.  On failure the error carries the tails of the Ray logs, and what was started is
    stopped again."""
    _check_can_run()
    current = running()
    if current is not None:
        try:
            _jobs_api_answers()
        except LocalClusterError as exc:
            raise RayLocalError(
                f"the local Ray cluster runs but {exc}; stop it (python -m cluster.testbed.ray "
                "stop) and start it again"
            ) from exc
        return current
    deadline = time.monotonic() + timeout_s
    if common.link_exists(BRIDGE) and TOKEN_PATH.is_file() and _head_healthy():
        return start_worker_node(timeout_s=timeout_s)
    if _leftovers():
        stop()
    for port in (GCS_PORT, DASHBOARD_PORT):
        owners = _port_owners(port)
        if owners:
            raise RayLocalError(
                f"TCP port {port} (needed by the local Ray cluster) is taken by {', '.join(owners)}, "
                "which moe-parallel did not start; stop it first"
            )
    for old in LOG_DIR.glob("*.start.out"):  # so that error messages show only this start's output
        old.unlink()
    with common.undone_on_failure(stop, "cleaning up after the failed start", RayLocalError):
        ensure_token()
        _ensure_network()
        options = [
            "--head",
            "--port",
            str(GCS_PORT),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            DASHBOARD_HOST,
            "--dashboard-port",
            str(DASHBOARD_PORT),
        ]
        _ray_start("head", HEAD_IP, HEAD_RESOURCE, options, deadline)
        _wait("head node alive and Jobs API answering", _head_up, deadline)
        _start_worker(deadline)
    return _info()


def _head_healthy() -> bool:
    """Whether the head node is alive and its Jobs API answers (the worker may be lost)."""
    try:
        return _head_up()
    except LocalClusterError:
        return False


def _start_worker(deadline: float) -> None:
    """Start the worker node inside the namespace and wait until it is alive.  A node killed a
    moment ago may still count as alive in the GCS: it is not taken for the new one."""
    stale = _alive_ids(_nodes(), WORKER_IP)
    _check_gcs_reachable_from_netns()
    _ray_start(
        "worker",
        WORKER_IP,
        WORKER_RESOURCE,
        ["--address", f"{HEAD_IP}:{GCS_PORT}"],
        deadline,
        prefix=tuple(common.nsenter_net(NETNS)),
    )
    _wait("worker node alive", lambda: _worker_up(exclude=stale), deadline)


def _leftovers() -> bool:
    """Whether anything of ours exists that a new start would collide with."""
    return (
        common.link_exists(BRIDGE)
        or NETNS_PATH.exists()
        or common.link_exists(OUTER_IF)
        or bool(_marked_pids())
    )


@_locked
def stop_worker_node(timeout_s: float = 30) -> None:
    """Lose the worker node as on a machine failure: SIGKILL every process in its namespace (its
    raylet, workers and agents; no `ray stop`, which would kill the head too) and return when they
    are gone.  The GCS marks the node dead only after its health checks fail (about 12 s here);
    until then ray.nodes() still calls it alive."""
    _kill_until_gone(
        lambda: sorted(set(common.netns_pids(NETNS)) | set(_marked_pids("worker"))),
        f"processes of the worker node (namespace {NETNS})",
        timeout_s,
    )


@_locked
def start_worker_node(timeout_s: float = 60) -> RayClusterInfo:
    """Start the worker node again (after stop_worker_node) and wait until it is alive; needs a
    healthy head.  A worker node that is already alive is left as is."""
    _check_can_run()
    deadline = time.monotonic() + timeout_s
    try:
        _head_up()
    except LocalClusterError as exc:
        raise RayLocalError(
            f"cannot start the worker node: the head is not healthy ({exc}); use start()"
        ) from exc
    if _worker_processes_up() and _alive(_nodes(), WORKER_IP, WORKER_RESOURCE) is not None:
        return _info()
    stop_worker_node()  # a half-dead node (raylet gone, workers left) would hold the ports
    with common.undone_on_failure(
        stop_worker_node, "killing the failed worker node", RayLocalError
    ):
        _ensure_network()
        _start_worker(deadline)
    return _info()


@_locked
def stop() -> None:
    """Stop everything start() made, whichever parts exist (works after a half-failed start):
    the namespace's processes and every process carrying our marker (SIGKILL), then
    the namespace, veth and bridge.  Every step runs even when an earlier one failed; the
    failures are raised together at the end.  The token file is kept for the next start."""
    errors: list[str] = []
    try:
        _kill_all()
    except LocalClusterError as exc:
        errors.append(str(exc))
    errors += _teardown_network()
    try:
        # `ray start --head` records its address here for ray.init(address="auto"); do not leave
        # it pointing at a cluster that is gone.
        if (
            RAY_CURRENT_CLUSTER.is_file()
            and RAY_CURRENT_CLUSTER.read_text().strip() == f"{HEAD_IP}:{GCS_PORT}"
        ):
            RAY_CURRENT_CLUSTER.unlink()
    except OSError as exc:
        errors.append(f"removing {RAY_CURRENT_CLUSTER}: {exc}")
    if errors:
        raise RayLocalError("stopping the local Ray cluster left problems:\n" + "\n".join(errors))


def _kill_all(timeout_s: float = 30) -> None:
    """SIGKILL the namespace's processes and our marked ones until none is left."""
    _kill_until_gone(
        lambda: sorted(set(common.netns_pids(NETNS)) | set(_marked_pids())),
        "processes of the local Ray cluster",
        timeout_s,
    )


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit 1 from status when not running, 2 on errors."""

    def describe() -> dict | None:
        info = running()
        return None if info is None else {**info.to_json(), "env": info.env()}

    def start_action(args) -> int:
        t0 = time.monotonic()
        info = start(timeout_s=args.timeout)
        common.print_json({**info.to_json(), "env": info.env()})
        print(f"ready after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        return 0

    def env_action(_args) -> int:
        info = running()
        if info is None:
            print("error: the local Ray cluster is not running", file=sys.stderr)
            return 1
        for key, value in info.env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0

    def stop_worker_action(_args) -> None:
        stop_worker_node()
        print("worker node processes killed")

    return common.run_cli(
        "python -m cluster.testbed.ray",
        __doc__,
        [
            common.Command(
                "start",
                "start the local two-node Ray cluster (token auth on)",
                start_action,
                (
                    common.option(
                        "--timeout", type=float, default=90, help="seconds to wait for the nodes"
                    ),
                ),
            ),
            common.stop_command(stop, "stop the cluster and remove its namespace and bridge"),
            common.status_command(describe),
            common.Command(
                "env", "print `export` lines with the token settings a client needs", env_action
            ),
            common.Command(
                "stop-worker",
                "SIGKILL the worker node's processes (simulated node loss)",
                stop_worker_action,
            ),
            common.Command(
                "start-worker",
                "start the worker node again",
                lambda args: common.print_json(start_worker_node(timeout_s=args.timeout).to_json()),
                (
                    common.option(
                        "--timeout", type=float, default=60, help="seconds to wait for the node"
                    ),
                ),
            ),
        ],
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
