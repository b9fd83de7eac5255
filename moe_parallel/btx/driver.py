"""The BTX driver: seed -> branches (at the same time) -> mix -> finetune -> evaluation.

Every decision is written to ``PLAN_RUN/btx.json`` before it is acted on (see state.py), so a
driver that dies is replaced by `moectl btx resume`: finished stages are skipped, runs still
going on SLURM or Ray are re-attached, stopped ones continue from their own checkpoints. Branches
never communicate: a failing branch is restarted (local backend: by the driver, from its own
checkpoint; SLURM and Ray: by their own job machinery) while the others keep training, and a
branch that exhausts its restarts is reported without stopping them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster import RunSpec, RunState, run_local
from cluster.backends import backend_class
from cluster.registry import read_heartbeat

from ..ckpt.checkpoint import latest_checkpoint
from ..config import dump_config, load_config
from ..runtime.bootstrap import local_rank_preload
from .domains import PreparedDomains, prepare_domains
from .launcher import StageLauncher, current_record
from .mix_cli import check_mix, run_mix_job
from .plan import (
    BtxPlan,
    absolute_paths,
    branch_stage,
    check_plan,
    dump_plan,
    finetune_stage,
    load_plan,
    moe_stage,
    seed_stage,
)
from .state import DONE, FAILED, PENDING, RUNNING, SKIPPED, BtxState, Stage, read_state, write_state

# Test hook (like MOE_PARALLEL_FAULT, never set by a plan): "DOMAIN=FAULT" gives that branch's
# ranks MOE_PARALLEL_FAULT=FAULT, e.g. "code=kill:rank=0:step=5:times=1".
FAULT_ENV = "MOE_PARALLEL_BTX_FAULT"
PLAN_COPY = "plan.yaml"
REPORT = "btx_report.json"
EXIT_WAITING = 3  # a branch failed for good and the plan waits for it (mix.on_failed_branch)
_PROGRESS_EVERY_S = 15.0


@dataclass
class TrainJob:
    config: str
    overrides: list[str]
    env: dict[str, str] = field(default_factory=dict)


class Driver:
    def __init__(self, plan_run: Path, state: BtxState, poll_s: float = 1.0):
        self.plan_run, self.state, self.poll_s = plan_run, state, poll_s
        self.plan: BtxPlan = load_plan(plan_run / PLAN_COPY)
        branch = [*self.plan.seed.overrides, *self.plan.branches.overrides]
        ranks = sum(
            load_config(self.plan.seed.config, [*branch, *d.overrides]).world_size
            for d in self.plan.domains.values()
        )
        self.launcher = StageLauncher(
            state.backend, state.cluster, state.profile_overrides, plan_run / "runs", ranks
        )

    # -----------------------------------------------------------------------------------------
    def run(self) -> int:
        self.state.claim_driver()
        self.state.status, self.state.message = RUNNING, None
        self.state.started = self.state.started or time.time()
        self._save()
        self.say(
            f"BTX plan {self.plan.name}: {len(self.plan.domains)} domains "
            f"({', '.join(self.plan.domains)}) on the {self.state.backend} backend"
        )
        data = prepare_domains(self.plan)
        seed_ckpt = self._seed(data)
        if seed_ckpt is None:
            return self.end("failed", f"the seed run failed: {self.state.stage('seed').message}", 1)
        branches = self._branches(data, seed_ckpt)
        unused = [
            d for d in self.plan.domains if d not in branches and d not in self.plan.expert_domains
        ]
        if unused:
            self.say(
                f"branches {unused} failed; they are not experts (mix.experts), so the plan goes on"
            )
        failed = [d for d in self.plan.expert_domains if d not in branches]
        if failed and (self.plan.mix.on_failed_branch == "wait" or not branches):
            return self.end(
                "waiting",
                f"branches {failed} failed for good; the mix waits for "
                f"them: fix the cause, then `moectl btx resume {self.plan_run}`",
                EXIT_WAITING,
            )
        if failed:
            self.say(
                f"PROCEEDING WITHOUT branches {failed} (mix.on_failed_branch=proceed): "
                f"the MoE gets {len(self._experts(seed_ckpt, branches))} experts"
            )
        experts = self._experts(seed_ckpt, branches)
        mixed = self._mix(data, experts, seed_ckpt)
        if mixed is None:
            return self.end("failed", f"the mix failed: {self.state.stage('mix').message}", 1)
        final = self._finetune(data, len(experts), mixed)
        if final is None:
            return self.end(
                "failed", f"the finetune failed: {self.state.stage('finetune').message}", 1
            )
        report = self._evaluate(data, seed_ckpt, branches, final)
        if report is None:
            return self.end("failed", f"evaluation failed: {self.state.stage('eval').message}", 1)
        print_report(report)
        return self.end("completed", None, 0)

    # ---- stages -----------------------------------------------------------------------------
    def _seed(self, data: PreparedDomains) -> str | None:
        stage = self.state.stage("seed")
        if self.plan.seed.checkpoint is not None:
            if stage.state != DONE:
                seed_cfg = load_config(
                    self.plan.seed.config, seed_stage(self.plan, data.all_prefixes, data.tokenizer)
                )
                (self.plan_run / "seed.yaml").write_text(dump_config(seed_cfg))
                self._set(
                    stage,
                    state=DONE,
                    checkpoint=str(Path(self.plan.seed.checkpoint).resolve()),
                    message="given by seed.checkpoint",
                )
            return stage.checkpoint
        job = TrainJob(
            self.plan.seed.config, seed_stage(self.plan, data.all_prefixes, data.tokenizer)
        )
        self._train({"seed": job}, max_restarts=self.plan.branches.max_restarts)
        return stage.checkpoint if stage.state == DONE else None

    def _branches(self, data: PreparedDomains, seed_ckpt: str) -> dict[str, str]:
        faults = _branch_faults()
        jobs = {
            f"branch:{d}": TrainJob(
                self.plan.seed.config,
                branch_stage(self.plan, d, data.prefixes[d], data.tokenizer, seed_ckpt),
                {"MOE_PARALLEL_FAULT": faults[d]} if d in faults else {},
            )
            for d in self.plan.domains
        }
        self._train(jobs, max_restarts=self.plan.branches.max_restarts)
        return {
            d: self.state.stage(f"branch:{d}").checkpoint
            for d in self.plan.domains
            if self.state.stage(f"branch:{d}").state == DONE
        }

    def _experts(self, seed_ckpt: str, branches: dict[str, str]) -> list[str]:
        chosen = [branches[d] for d in self.plan.expert_domains if d in branches]
        return ([seed_ckpt] if self.plan.mix.seed_expert else []) + chosen

    def _mix(self, data: PreparedDomains, experts: list[str], seed_ckpt: str) -> str | None:
        stage = self.state.stage("mix")
        if stage.state == DONE:
            return stage.checkpoint
        dense = load_config(self._seed_config(), [])
        moe = load_config(
            self.plan.mix.moe_config,
            moe_stage(self.plan, len(experts), data.all_prefixes, data.tokenizer),
        )
        check_mix(dense, moe, experts)
        run_dir = self._fresh_dir("mix")
        self._set_running(stage, run_dir)
        self.say(f"mixing {len(experts)} experts into {run_dir}")
        code = run_mix_job(
            dense,
            moe,
            experts,
            run_dir,
            stream=False,
            non_expert_from=seed_ckpt if self.plan.mix.non_expert == "seed" else None,
            router_init_std=self.plan.mix.router_init_std,
        )
        if code != 0:
            self._set(stage, state=FAILED, message=f"exit {code}; see {run_dir}/logs/rank0.log")
            return None
        self._set(
            stage,
            state=DONE,
            checkpoint=str(run_dir / "checkpoints" / "step_00000000"),
            ended=time.time(),
        )
        return stage.checkpoint

    def _finetune(self, data: PreparedDomains, num_experts: int, mixed: str) -> str | None:
        job = TrainJob(
            self.plan.mix.moe_config,
            finetune_stage(self.plan, num_experts, data.all_prefixes, data.tokenizer, mixed),
        )
        self._train({"finetune": job}, max_restarts=self.plan.branches.max_restarts)
        stage = self.state.stage("finetune")
        return stage.checkpoint if stage.state == DONE else None

    def _evaluate(
        self, data: PreparedDomains, seed_ckpt: str, branches: dict[str, str], final: str
    ) -> dict | None:
        stage = self.state.stage("eval")
        models = [{"name": "seed", "config": self._seed_config(), "checkpoint": seed_ckpt}]
        models += [
            {"name": f"branch:{d}", "config": self._run_config(f"branch:{d}"), "checkpoint": ckpt}
            for d, ckpt in branches.items()
        ]
        models.append({"name": "btx", "config": self._run_config("finetune"), "checkpoint": final})
        run_dir = self._fresh_dir("eval")
        seed_cfg = load_config(self._seed_config())
        spec = {
            "models": models,
            "tokenizer": data.tokenizer,
            "split": self.plan.split,
            "datasets": {d: [p] for d, p in data.prefixes.items()},
            "batches": self.plan.eval.batches,
            "seed": self.plan.eval.seed,
            "global_batch_size": seed_cfg.train.global_batch_size,
        }
        (run_dir / "eval.json").write_text(json.dumps(spec, indent=1))
        (run_dir / "config.yaml").write_text(dump_config(seed_cfg))
        self._set(stage, state=RUNNING, run_dir=str(run_dir), attempts=stage.attempts + 1)
        self.say(f"evaluating {len(models)} models on the held-out split of every domain")
        code = run_local(
            RunSpec(
                run_dir,
                1,
                [sys.executable, "-m", "moe_parallel.train.eval_entry", str(run_dir)],
                preload=local_rank_preload(seed_cfg.train.device),
            ),
            stream=False,
        )
        if code != 0:
            self._set(stage, state=FAILED, message=f"exit {code}; see {run_dir}/logs/rank0.log")
            return None
        losses = json.loads((run_dir / "eval_report.json").read_text())["losses"]
        report = build_report(self.plan, self.state, losses)
        (self.plan_run / REPORT).write_text(json.dumps(report, indent=1))
        self._set(stage, state=DONE, checkpoint=None, ended=time.time())
        return report

    # ---- training runs ----------------------------------------------------------------------
    def _train(self, jobs: dict[str, TrainJob], max_restarts: int) -> None:
        """Run the jobs at the same time until each is done or failed for good."""
        active = {}
        for name, job in jobs.items():
            stage = self.state.stage(name)
            if stage.state == DONE:
                continue
            if stage.run_dir is None:
                self._submit(name, job)
            elif self._settle(name, job, max_restarts):
                continue  # it ended while no driver watched (recorded now)
            elif stage.state != RUNNING or stage.attempts == 0:
                self.say(f"{name}: re-attached to {stage.run_dir} (still running)")
                self._set(stage, state=RUNNING, attempts=max(stage.attempts, 1))
            active[name] = job
        last_progress = time.monotonic()
        while active:
            time.sleep(self.poll_s)
            for name in list(active):
                if self._settle(name, active[name], max_restarts):
                    del active[name]
            if time.monotonic() - last_progress >= _PROGRESS_EVERY_S and active:
                last_progress = time.monotonic()
                self.say("progress: " + "; ".join(self._progress(n) for n in active))

    def _set_running(self, stage, run_dir: Path, **fields) -> None:
        """A stage (re)started in ``run_dir``: one more attempt, its first start kept."""
        self._set(
            stage,
            state=RUNNING,
            run_dir=str(run_dir),
            attempts=stage.attempts + 1,
            started=stage.started or time.time(),
            **fields,
        )

    def _submit(self, name: str, job: TrainJob) -> None:
        stage = self.state.stage(name)
        resume = stage.run_dir  # continue its own checkpoints, never another stage's
        run_dir = self.launcher.start(job.config, job.overrides, resume, job.env)
        self._set_running(stage, run_dir, message=None)
        what = "restarted" if resume else "started"
        self.say(f"{name}: {what} {run_dir} (attempt {stage.attempts})")

    def _settle(self, name: str, job: TrainJob, max_restarts: int) -> bool:
        """True when the stage's run ended for good (done or failed)."""
        stage = self.state.stage(name)
        record = current_record(Path(stage.run_dir))
        if not record.status.terminal:
            return False
        if record.status is RunState.COMPLETED:
            ckpt = latest_checkpoint(Path(stage.run_dir) / "checkpoints")
            self._set(stage, state=DONE, checkpoint=str(ckpt), ended=time.time())
            self.say(f"{name}: done ({ckpt})")
            return True
        reason = (record.failure_reason or record.status.value).splitlines()[0]
        # What restarts inside its job (SLURM, Ray) reaches here having exhausted its restarts.
        restartable = not backend_class(self.state.backend).restarts_inside_the_job
        if restartable and stage.attempts <= max_restarts and record.status is RunState.FAILED:
            self.say(f"{name}: failed ({reason}); restarting from its own checkpoint")
            self._submit(name, job)
            return False
        self._set(stage, state=FAILED, message=reason, ended=time.time())
        self.say(f"{name}: FAILED for good after {stage.attempts} attempts: {reason}")
        return True

    def _progress(self, name: str) -> str:
        beat = read_heartbeat(self.state.stage(name).run_dir)
        return f"{name} step {beat['step'] if beat else '-'}"

    # ---- helpers ----------------------------------------------------------------------------
    def _seed_config(self) -> str:
        seed = self.state.stage("seed")
        if seed.run_dir:
            return str(Path(seed.run_dir) / "config.yaml")
        return str(self.plan_run / "seed.yaml")

    def _run_config(self, name: str) -> str:
        return str(Path(self.state.stage(name).run_dir) / "config.yaml")

    def _fresh_dir(self, name: str) -> Path:
        """A new directory per attempt: a half-finished mix or evaluation is never reused."""
        attempt = self.state.stage(name).attempts + 1
        path = self.plan_run / "runs" / f"{name}-{attempt}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def _set(self, stage: Stage, **values) -> None:
        for key, value in values.items():
            setattr(stage, key, value)
        self._save()

    def _save(self) -> None:
        write_state(self.plan_run, self.state)

    def end(self, status: str, message: str | None, code: int) -> int:
        self.state.status, self.state.message, self.state.ended = status, message, time.time()
        self.state.driver_pid = None
        self._save()
        self.say(f"plan {status}" + (f": {message}" if message else ""))
        return code

    def say(self, message: str) -> None:
        print(f"[btx {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _branch_faults() -> dict[str, str]:
    text = os.environ.get(FAULT_ENV, "")
    faults = {}
    for item in filter(None, text.split(",")):
        domain, _, fault = item.partition("=")
        faults[domain] = fault
    return faults


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def build_report(plan: BtxPlan, state: BtxState, losses: dict[str, dict[str, float]]) -> dict:
    seed = losses["seed"]
    branch_beats_seed = {
        d: losses[f"branch:{d}"][d] < seed[d] for d in plan.domains if f"branch:{d}" in losses
    }
    btx_beats_seed = {d: losses["btx"][d] < seed[d] for d in plan.domains}
    branches = [state.stage(f"branch:{d}") for d in plan.domains]
    done = [b for b in branches if b.started and b.ended]
    branch_sum = sum(b.ended - b.started for b in done)
    branch_wall = (max(b.ended for b in done) - min(b.started for b in done)) if done else 0.0
    return {
        "losses": losses,
        "branch_beats_seed_on_its_domain": branch_beats_seed,
        "btx_beats_seed_on_every_domain": btx_beats_seed,
        "timing": {
            "plan_wall_s": round(time.time() - (state.started or time.time()), 1),
            "branches_wall_s": round(branch_wall, 1),
            "branches_sum_s": round(branch_sum, 1),
            "branch_parallelism": round(branch_sum / branch_wall, 2) if branch_wall else None,
        },
    }


def print_report(report: dict) -> None:
    losses = report["losses"]
    domains = list(losses["seed"])
    print("held-out loss  " + "".join(f"{d:>14}" for d in domains))
    for model, row in losses.items():
        print(f"{model:<15}" + "".join(f"{row[d]:>14.4f}" for d in domains))
    print(
        "branch beats the seed on its own domain: "
        + ", ".join(f"{d}={v}" for d, v in report["branch_beats_seed_on_its_domain"].items())
    )
    print(
        "BTX MoE beats the seed on every domain: "
        + ", ".join(f"{d}={v}" for d, v in report["btx_beats_seed_on_every_domain"].items())
    )
    t = report["timing"]
    print(
        f"plan wall time {t['plan_wall_s']} s; branches: wall {t['branches_wall_s']} s, sum "
        f"{t['branches_sum_s']} s, parallelism {t['branch_parallelism']}x",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Entry points (moectl btx run / resume)
# ---------------------------------------------------------------------------------------------
def start_plan(
    plan_path: str,
    overrides: list[str],
    backend: str,
    cluster: str | None,
    profile_overrides: list[str],
    runs_root: str | None,
) -> tuple[Path, Driver]:
    """Validate the plan (and every stage's config) and create the plan run directory."""
    from cluster import new_run_dir
    from cluster.profile import load_profile

    plan = load_plan(plan_path, overrides)
    check_plan(plan)
    backend_class(backend)  # an unknown name is refused with the allowed values
    load_profile(cluster, [*profile_overrides, f"backend={backend}"])  # fails early
    plan_run = new_run_dir(Path(runs_root) if runs_root else None, f"btx-{plan.name}")
    (plan_run / PLAN_COPY).write_text(dump_plan(absolute_paths(plan)))
    state = BtxState(
        plan=str(plan_run / PLAN_COPY),
        backend=backend,
        cluster=cluster,
        profile_overrides=list(profile_overrides),
    )
    write_state(plan_run, state)
    return plan_run, Driver(plan_run, state)


def resume_plan(plan_run: Path) -> Driver:
    state = read_state(plan_run)
    if state.driver_alive():
        raise ValueError(
            f"the driver of {plan_run} is still running (pid {state.driver_pid}); "
            "a second one would race it"
        )
    if state.status == "completed":
        raise ValueError(f"plan run {plan_run} already completed (see {plan_run / REPORT})")
    for stage in state.stages.values():
        if stage.state != DONE:
            stage.attempts = 0  # a resumed plan gives every unfinished stage its restarts again
            if stage.state == FAILED:
                stage.state = PENDING
    return Driver(plan_run, state)


__all__ = ["Driver", "EXIT_WAITING", "FAULT_ENV", "REPORT", "SKIPPED", "resume_plan", "start_plan"]
