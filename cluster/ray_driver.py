"""What runs inside a Ray job: the driver that places, supervises and restarts a run's ranks.

``python -m cluster.ray_driver RUN_DIR`` is the entrypoint ``moectl submit --backend ray`` hands to
Ray's job submission, so the run outlives the user's terminal. Per attempt the driver:

1. reserves one bundle per rank in a placement group (strategy from the profile; PACK = as few
   nodes as possible) and waits for it at most ``placement_timeout_s``;
2. starts one :class:`RankActor` per bundle; rank 0's node address and a port free there form
   the rendezvous; each actor runs the training entry as a child process (which dies with the
   actor: PR_SET_PDEATHSIG), with ``GLOO_SOCKET_IFNAME`` set to the interface holding its node's
   address (otherwise gloo may advertise a loopback address and peers cannot connect);
3. waits for the ranks; the first failure (a non-zero exit, a dead actor, a lost node) tears the
   whole group down and, unless :func:`cluster.restart_policy.refuse_restart` says no, starts a
   new attempt, which resumes from the newest checkpoint. Each restart and its cause go to
   ``state.json``. With a ``hang_timeout_s`` the driver also runs the hang watchdog
   (cluster/watchdog.py) on the ranks' heartbeats: a hang makes every rank's actor
   dump its rank's stacks, is recorded in ``state.json`` and the logs, and fails the attempt
   (restarted like any failure).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import registry
from cluster.elastic import (
    ElasticSpec,
    clear_grow_back,
    elastic_env,
    grow_back_requested,
    record_resize,
    request_grow_back,
)
from cluster.env import EXIT_REQUEUE, RUN_DIR_ENV, free_port, rank_env
from cluster.netif import interface_for_address
from cluster.procs import run_supervised
from cluster.profile import RayProfile
from cluster.ray_backend import JOB_FILE, bundles_per_node, bundles_that_fit, ray_dir
from cluster.registry import HEARTBEATS_DIR, RankFailure, Restart, RunLayout
from cluster.restart_policy import refuse_restart
from cluster.state import RunState
from cluster.watchdog import HangWatchdog, describe, dump_stacks, hang_signature, record_hang

TAIL_LINES = 15


class RankActor:
    """One rank: reports where it runs, then runs the entry and returns its exit code."""

    def __init__(self, run_dir: str, rank: int) -> None:
        self.run_dir, self.rank = Path(run_dir), rank
        self.ip = ray.util.get_node_ip_address()

    def where(self) -> dict:
        return {
            "ip": self.ip,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def free_port(self) -> int:
        return free_port(self.ip)

    def dump_stacks(self) -> list[int]:
        """Send the stack-dump signal to the rank (this actor's child); answered while run()
        blocks (max_concurrency=2). Returns the pids signalled."""
        import psutil

        pids = [p.pid for p in psutil.Process().children()]
        dump_stacks(pids)
        return pids

    def run(self, entry: list[str], env: dict[str, str], header: str) -> int:
        full = {**os.environ, **env}
        full.setdefault("GLOO_SOCKET_IFNAME", interface_for_address(self.ip))
        return run_supervised(
            entry,
            full,
            RunLayout(self.run_dir).log(self.rank),
            f"{header} rank {self.rank} on {self.ip} at {registry.now_iso()}",
        )


@dataclass
class Outcome:
    kind: str  # completed | preempted | resized | failed | cancelled
    reason: str = ""
    failure: RankFailure | None = None


class CapacityError(RuntimeError):
    """The placement group could not be placed within placement_timeout_s."""


class Driver:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.job = json.loads((ray_dir(run_dir) / JOB_FILE).read_text())
        self.profile = self.job["profile"]
        self.bundle = RayProfile(**self.profile).bundle()  # what one rank reserves
        self.submission = os.environ.get("MOE_PARALLEL_RAY_SUBMISSION", "ray")
        # Elastic runs (cluster/elastic.py): this attempt's replicas, the nodes lost so far (Ray
        # may call a dead node alive for a while), and why the last attempt ended.
        self.elastic = ElasticSpec.from_dict(self.job.get("elastic"))
        self.replicas = self.elastic.full if self.elastic is not None else None
        self.world = int(self.job["world_size"])  # this attempt's ranks
        self.lost_nodes: set[str] = set()
        self.last_cause = ""

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        self._update(status=RunState.RUNNING, started_at=registry.now_iso())
        attempt = 0
        while True:
            try:
                outcome = self._attempt(attempt)
            except CapacityError as exc:
                return self._end(RunState.FAILED, str(exc))
            if outcome.kind == "completed":
                return self._end(RunState.COMPLETED, None)
            if outcome.kind == "cancelled":
                return 0
            step = _last_step(self.run_dir)
            self.last_cause = outcome.reason
            if outcome.kind == "failed":
                refusal = refuse_restart(
                    outcome.reason,
                    step,
                    registry.read_record(self.run_dir).restarts,
                    int(self.profile["max_restarts"]),
                )
                if refusal is not None:
                    return self._end(RunState.FAILED, refusal, outcome.failure)
            restart = Restart(
                at=registry.now_iso(),
                reason=outcome.reason,
                attempt=f"{self.submission}.{attempt}",
                kind=outcome.kind,
                step=step,
            )

            def requeued(record) -> None:
                if record.status is not RunState.CANCELLED:  # a cancel in between stays
                    record.restarts.append(restart)
                    record.status = RunState.REQUEUED

            if registry.update_record(self.run_dir, requeued).status is RunState.CANCELLED:
                return 0
            print(
                f"moe-parallel: attempt {attempt} {outcome.kind}: {outcome.reason}; restarting "
                "from the newest checkpoint",
                flush=True,
            )
            attempt += 1

    def _attempt(self, attempt: int) -> Outcome:
        bundle = self.bundle
        group = self._place(attempt, bundle)
        actors = []
        try:
            if attempt:
                self._update(status=RunState.RUNNING)
            actors = [self._actor(group, rank, bundle) for rank in range(self.world)]
            return self._supervise(actors, attempt)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(group)

    def _place(self, attempt: int, bundle: dict):
        """The attempt's placement group, placed. An elastic run tries its full size for
        ``wait_for_capacity_s`` after a failure, then the largest size the alive nodes hold."""
        strategy = self.profile["strategy"]
        timeout = float(self.profile["placement_timeout_s"])
        if self.elastic is None or attempt == 0:
            return self._placed([bundle] * self.world, strategy, timeout, bundle)
        full = self.elastic.world(self.elastic.full)
        group = placement_group([bundle] * full, strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=self.elastic.wait_for_capacity_s)
        if ready:
            self._resize(attempt, self.elastic.full)
            return group
        remove_placement_group(group)
        nodes = self._usable_nodes()
        replicas = self.elastic.largest_that_fits(bundles_that_fit(nodes, bundle, strategy))
        if replicas is None:
            raise CapacityError(
                f"the Ray cluster's alive nodes hold fewer ranks than the smallest elastic size "
                f"({self.elastic.world(self.elastic.replica_counts[-1])} bundle(s) of {bundle} "
                f"with strategy {strategy}); available now: {ray.available_resources()}"
            )
        self._resize(attempt, replicas)
        pinned = pinned_bundles(nodes, bundle, strategy, self.world)
        return self._placed(pinned, strategy, timeout, bundle)

    def _placed(self, bundles: list[dict], strategy: str, timeout: float, bundle: dict):
        group = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=timeout)
        if not ready:
            remove_placement_group(group)
            raise CapacityError(
                f"the Ray cluster could not place {len(bundles)} bundle(s) of {bundle} with "
                f"strategy {strategy} within {timeout:.0f} s (ray.placement_timeout_s); "
                f"available now: {ray.available_resources()}"
            )
        return group

    def _usable_nodes(self) -> list[dict]:
        """Alive nodes that are not among those this run lost, with their total resources."""
        return [
            {"ip": n["NodeManagerAddress"], "resources": n["Resources"]}
            for n in ray.nodes()
            if n["Alive"] and n["NodeID"] not in self.lost_nodes
        ]

    def _resize(self, attempt: int, replicas: int) -> None:
        """This attempt runs ``replicas`` replicas: recorded when that changes the size."""
        assert self.elastic is not None and self.replicas is not None
        if replicas != self.replicas:
            record_resize(
                self.run_dir,
                self.elastic,
                self.replicas,
                replicas,
                self.last_cause,
                f"{self.submission}.{attempt}",
                _last_step(self.run_dir),
            )
            print(
                f"moe-parallel: {self.replicas} -> {replicas} data-parallel replicas: "
                f"{self.last_cause}",
                flush=True,
            )
        self.replicas, self.world = replicas, self.elastic.world(replicas)
        clear_grow_back(self.run_dir)

    def _actor(self, group, rank: int, bundle: dict):
        # max_concurrency=2: the actor answers where() while run() blocks (see _unanswering).
        options = dict(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            max_restarts=0,
            max_concurrency=2,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank
            ),
        )
        return ray.remote(RankActor).options(**options).remote(str(self.run_dir), rank)

    def _supervise(self, actors, attempt: int) -> Outcome:
        places = ray.get([a.where.remote() for a in actors])
        port = ray.get(actors[0].free_port.remote())
        self._record_places(attempt, places)
        refs = {}
        watchdog = self._watchdog()
        for rank, actor in enumerate(actors):
            env = self._rank_env(rank, places, port)
            header = f"Ray job {self.submission} attempt {attempt}"
            refs[actor.run.remote(self._entry(), env, header)] = rank
        pending, codes = list(refs), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if registry.read_record(self.run_dir).status is RunState.CANCELLED:
                return Outcome("cancelled")
            self._grow_back_when_possible()
            hang = watchdog.check(self.run_dir) if watchdog is not None and not done else None
            if hang is not None:
                return self._hung(actors, attempt, hang)
            for ref in done:
                rank = refs[ref]
                try:
                    codes[rank] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    return self._lost(rank, places[rank], exc)
                if codes[rank] not in (0, EXIT_REQUEUE):
                    # A rank that exits on a collective error is usually the echo of a peer
                    # lost a moment earlier (Ray declares a node dead only after ~10 s): name
                    # the peer that no longer answers, when there is one.
                    lost = self._unanswering(actors, exclude=rank)
                    if lost is not None:
                        return self._lost(lost[0], places[lost[0]], lost[1])
                    return self._failed(rank, codes[rank])
        if all(c == 0 for c in codes.values()):
            return Outcome("completed")
        if self.elastic is not None and grow_back_requested(self.run_dir):
            return Outcome(
                "resized",
                f"stopped at the checkpoint of step {_last_step(self.run_dir)} to grow back: "
                "the capacity came back",
            )
        return Outcome(
            "preempted",
            f"stopped by a signal after step {_last_step(self.run_dir)}, checkpoint saved",
        )

    def _grow_back_when_possible(self) -> None:
        """A shrunk run asks its ranks to stop at their next checkpoint once the alive nodes
        (its own bundles included) hold a larger size."""
        elastic = self.elastic
        if elastic is None or not elastic.grow_back or self.replicas == elastic.full:
            return
        if grow_back_requested(self.run_dir):
            return
        fits = bundles_that_fit(self._usable_nodes(), self.bundle, self.profile["strategy"])
        target = elastic.largest_that_fits(fits)
        if target is not None and target > self.replicas:
            request_grow_back(self.run_dir, target)
            print(
                f"moe-parallel: capacity for {target} replicas: growing back at the next checkpoint",
                flush=True,
            )

    def _watchdog(self):
        """The attempt's hang watchdog (None without hang_timeout_s). The previous attempt's
        heartbeat files are removed first: hosts' clocks need not agree with this one."""
        if not self.job.get("hang_timeout_s"):
            return None
        for old in (self.run_dir / HEARTBEATS_DIR).glob("rank*.json"):
            old.unlink()
        return HangWatchdog(float(self.job["hang_timeout_s"]), self.world, since=0.0)

    def _hung(self, actors, attempt: int, found: dict) -> Outcome:
        ray.get([a.dump_stacks.remote() for a in actors], timeout=30)
        hang = record_hang(self.run_dir, found, f"{self.submission}.{attempt}")
        registry.append_to_logs(
            self.run_dir, range(self.world), [f"moe-parallel Ray driver: {describe(hang)}"]
        )
        return Outcome("failed", hang_signature(hang.step, hang.hang_timeout_s))

    def _unanswering(self, actors, exclude: int, timeout_s: float = 5.0):
        """(rank, error) of the first other rank whose actor is dead or does not answer."""
        asked = {actor.where.remote(): rank for rank, actor in enumerate(actors) if rank != exclude}
        ready, late = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                return asked[ref], exc
        if late:
            return asked[late[0]], TimeoutError(f"no answer within {timeout_s:.0f} s: node lost")
        return None

    def _lost(self, rank: int, place: dict, exc: Exception) -> Outcome:
        text = str(exc)
        lost = (
            isinstance(exc, TimeoutError)
            or _node_lost(place["ip"], text)
            or not _node_answers(place["ip"])
        )
        if lost:
            self.lost_nodes.add(place["node_id"])
        how = "its node was lost" if lost else "its actor process died"
        print(f"moe-parallel: rank {rank}'s actor failed: {text[:2000]}", flush=True)
        reason = f"rank {rank} on {place['ip']} failed: {how}"
        return Outcome(
            "failed",
            reason,
            RankFailure(rank=rank, signal="lost", log_tail=_tail(self.run_dir, rank)),
        )

    def _failed(self, rank: int, code: int) -> Outcome:
        failure = RankFailure(
            rank=rank,
            exit_code=code if code >= 0 else None,
            signal=signal.Signals(-code).name if code < 0 else None,
            log_tail=_tail(self.run_dir, rank),
        )
        return Outcome("failed", failure.describe().split(";")[0], failure)

    # -- helpers ------------------------------------------------------------------------------
    def _entry(self) -> list[str]:
        entry = list(self.job["entry"])
        return [sys.executable, *entry[1:]] if self.job.get("job_python") else entry

    def _rank_env(self, rank: int, places: list[dict], port: int) -> dict[str, str]:
        same_node = [r for r, p in enumerate(places) if p["ip"] == places[rank]["ip"]]
        env = dict(self.job.get("env", {}))
        env.update(self.profile.get("env", {}))
        env.update(
            rank_env(
                rank=rank,
                world_size=self.world,
                local_rank=same_node.index(rank),
                local_world_size=len(same_node),
                master_addr=places[0]["ip"],
                master_port=port,
                threads_per_rank=self.job.get("threads_per_rank")
                or max(1, int(float(self.profile["cpus_per_rank"]))),
            )
        )
        env[RUN_DIR_ENV] = str(self.run_dir)
        if self.replicas is not None:
            env.update(elastic_env(self.replicas))
        return env

    def _record_places(self, attempt: int, places: list[dict]) -> None:
        folder = ray_dir(self.run_dir) / "attempts"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{attempt}.json").write_text(
            json.dumps({"attempt": attempt, "ranks": places}, indent=1)
        )

    def _update(self, **changes) -> None:
        def change(record) -> None:
            if record.status is not RunState.CANCELLED:  # a cancel in between stays
                for key, value in changes.items():
                    setattr(record, key, value)

        registry.update_record(self.run_dir, change)

    def _end(self, status: RunState, reason: str | None, failure: RankFailure | None = None) -> int:
        def end(record) -> None:
            if record.status is RunState.CANCELLED:
                return
            record.status, record.failure_reason, record.failure = status, reason, failure
            record.ended_at = registry.now_iso()
            record.exit_code = 0 if status is RunState.COMPLETED else 1

        record = registry.update_record(self.run_dir, end)
        if record.status is RunState.CANCELLED:
            return 0
        print(f"moe-parallel: run {status.value}" + (f": {reason}" if reason else ""), flush=True)
        return record.exit_code


def pinned_bundles(nodes: list[dict], bundle: dict, strategy: str, count: int) -> list[dict]:
    """``count`` bundles, each tied to one of ``nodes`` by its ``node:<ip>`` resource (Ray
    gives every node one): a node that died a moment ago may still be called alive, and a
    bundle must not wait for it. Nodes are filled in order, one bundle each for STRICT_SPREAD."""
    per_node = bundles_per_node(nodes, bundle)
    if strategy == "STRICT_SPREAD":
        per_node = [min(p, 1) for p in per_node]
    if strategy == "STRICT_PACK":
        best = max(range(len(nodes)), key=lambda i: per_node[i])
        per_node = [p if i == best else 0 for i, p in enumerate(per_node)]
    out = []
    for node, room in zip(nodes, per_node):
        take = min(room, count - len(out))
        out += [{**bundle, f"node:{node['ip']}": 0.001}] * take
    return out


@ray.remote(num_cpus=0)
def _answer() -> bool:
    return True


def _node_answers(ip: str, timeout_s: float = 8.0) -> bool:
    """Whether the node at ``ip`` runs a task now. Ray calls a node whose processes died alive
    until its health checks fail (about 12 s here); an actor that died with its node must not be
    taken for a process crash on a node still there, whose capacity an elastic run counts on."""
    probe = _answer.options(resources={f"node:{ip}": 0.001}).remote()
    try:
        return ray.get(probe, timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        ray.cancel(probe, force=True)
        return False


def _node_lost(ip: str, error: str) -> bool:
    """Whether the actor died with its node (Ray says so, or the node is no longer alive)."""
    lowered = error.lower()
    if "node has died" in lowered or "node died" in lowered or "node was terminated" in lowered:
        return True
    return not any(n["Alive"] and n["NodeManagerAddress"] == ip for n in ray.nodes())


def _last_step(run_dir: Path) -> int | None:
    beat = registry.read_heartbeat(run_dir)
    return int(beat["step"]) if beat else None


def _tail(run_dir: Path, rank: int) -> list[str]:
    path = RunLayout(run_dir).log(rank)
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-TAIL_LINES:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cluster.ray_driver RUN_DIR", file=sys.stderr)
        return 2
    ray.init(address="auto", log_to_driver=False)
    # Through the module, not __main__: the actor class must be importable by name on workers.
    from cluster import ray_driver

    return ray_driver.Driver(Path(argv[0])).run()


if __name__ == "__main__":
    sys.exit(main())
