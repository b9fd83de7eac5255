"""``moectl``: the command line. Each verb parses its arguments and calls into the packages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.backend import BackendError


def main(argv: list[str] | None = None) -> int:
    from moe_parallel.runtime.quiet import quiet_expected_warnings

    quiet_expected_warnings()  # the launcher imports Megatron too (config checks, data)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options: `submit cfg.yaml --nodes 2 train.steps=5`
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, BackendError) as exc:  # one clear message, no traceback
        print(f"moectl: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moectl", description="MoE pretraining on Megatron-core")
    verbs = p.add_subparsers(metavar="VERB")

    t = verbs.add_parser("train", help="pretrain on local ranks (one per layout rank)")
    t.add_argument("config", nargs="?", help="run config YAML (e.g. configs/tiny/moe_tiny.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
    t.add_argument("--runs", help="runs root directory (default $MOE_PARALLEL_RUNS or ./runs)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an existing run directory")
    t.add_argument("--threads-per-rank", type=int, help="CPU threads per rank")
    _add_memory_flags(t)
    t.set_defaults(func=_train)

    ft = verbs.add_parser(
        "finetune",
        help="instruction finetuning (Flan-MoE) on local ranks: "
        "`train` for a config with a finetune section",
    )
    ft.add_argument("config", help="finetune config YAML (e.g. configs/tiny/flan_moe_tiny.yaml)")
    ft.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides, e.g. "
        "checkpoint.init_from=RUN_DIR (a run, checkpoints or step directory)",
    )
    ft.add_argument("--runs", help="runs root directory (default $MOE_PARALLEL_RUNS or ./runs)")
    ft.add_argument("--threads-per-rank", type=int, help="CPU threads per rank")
    _add_memory_flags(ft)
    ft.set_defaults(func=_finetune)

    d = verbs.add_parser("data", help="data preparation")
    dverbs = d.add_subparsers(metavar="ACTION")
    prep = dverbs.add_parser(
        "prepare", help="tokenize the config's sources (or a BTX plan's domains) into .bin/.idx"
    )
    prep.add_argument("config")
    prep.add_argument("overrides", nargs="*")
    prep.set_defaults(func=_data_prepare)

    c = verbs.add_parser("config", help="validate a config and print it resolved")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_config)

    ck = verbs.add_parser("ckpt", help="checkpoints: verify, inspect")
    ckverbs = ck.add_subparsers(metavar="ACTION")
    cv = ckverbs.add_parser("verify", help="recompute every hash of a checkpoint's manifest")
    cv.add_argument("target", help="run directory, checkpoints directory or step directory")
    cv.add_argument("step", nargs="?", type=int)
    cv.set_defaults(func=lambda a: _ckpt("verify", a))
    ci = ckverbs.add_parser("inspect", help="what a checkpoint holds")
    ci.add_argument("target")
    ci.add_argument("step", nargs="?", type=int)
    ci.add_argument("--all", action="store_true", help="list optimizer tensors too")
    ci.set_defaults(func=lambda a: _ckpt("inspect", a))

    sb = verbs.add_parser("submit", help="submit a run to a cluster (SLURM or Ray) and return")
    sb.add_argument("config", nargs="?", help="run config YAML")
    sb.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides; slurm.* ones change the cluster profile",
    )
    sb.add_argument("--backend", choices=["slurm", "ray"], help="overrides the profile's backend")
    sb.add_argument(
        "--address", help="Ray: the job server, http://HEAD:8265 (same as ray.address=)"
    )
    sb.add_argument(
        "--cluster", help="cluster profile YAML (e.g. configs/clusters/local_slurm.yaml)"
    )
    sb.add_argument("--nodes", type=int, help="same as slurm.nodes=N")
    sb.add_argument("--partition", help="same as slurm.partition=P")
    sb.add_argument("--time", help="same as slurm.time=T (SLURM time format)")
    sb.add_argument("--runs", help="runs root directory (default $MOE_PARALLEL_RUNS or ./runs)")
    sb.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="resubmit an ended run; it resumes from its newest checkpoint",
    )
    sb.add_argument(
        "--threads-per-rank", type=int, help="CPU threads per rank (default: slurm.cpus_per_rank)"
    )
    sb.add_argument(
        "--wait", action="store_true", help="wait for the run to end; exit code says how"
    )
    _add_memory_flags(sb)
    sb.set_defaults(func=_submit)

    s = verbs.add_parser("status", help="runs and their state (one run in detail with RUN_DIR)")
    s.add_argument("run_dir", nargs="?")
    s.add_argument("--runs", help="runs root directory")
    _add_peak_flag(s)
    s.set_defaults(func=_status)

    w = verbs.add_parser(
        "watch",
        help="live view of one run: state, step, loss, and per node and "
        "rank heartbeat age, step, phase, collective, memory",
    )
    w.add_argument("run_dir")
    w.add_argument("--once", action="store_true", help="print one frame and exit")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    _add_peak_flag(w)
    w.set_defaults(func=_watch)

    pt = verbs.add_parser(
        "plot", help="PNGs of a run: loss, LR, tokens/s, expert load per layer, step time per rank"
    )
    pt.add_argument("run_dir")
    pt.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    pt.set_defaults(func=_plot)

    db = verbs.add_parser("dashboard", help="local web page of the registry's runs and their plots")
    db.add_argument("--port", type=int, default=8470)
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    db.add_argument("--runs", help="runs root directory")
    db.add_argument("--refresh", type=int, default=5, help="page reload interval, seconds")
    _add_peak_flag(db)
    db.set_defaults(func=_dashboard)

    lg = verbs.add_parser("logs", help="print a rank's log of a run")
    lg.add_argument("run_dir")
    lg.add_argument("--rank", type=int, default=0)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    lg.set_defaults(func=_logs)

    cn = verbs.add_parser("cancel", help="stop a run (SLURM: scancel) and record it as cancelled")
    cn.add_argument("run_dir")
    cn.set_defaults(func=_cancel)

    bt = verbs.add_parser("btx", help="Branch-Train-MiX")
    btverbs = bt.add_subparsers(metavar="ACTION")
    bm = btverbs.add_parser("mix", help="mix dense branch checkpoints into one MoE checkpoint")
    bm.add_argument("checkpoints", nargs="+", help="branch checkpoint directories, in expert order")
    bm.add_argument("--dense", required=True, help="the branches' (dense) run config")
    bm.add_argument("--moe", required=True, help="the mixed model's MoE run config")
    bm.add_argument("--runs", help="runs root directory")
    bm.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to both configs (e.g. data.cache_dir=...)",
    )
    bm.add_argument(
        "--non-expert-from",
        metavar="CKPT",
        help="take attention, norms and "
        "embeddings from this dense checkpoint (e.g. the seed) instead of the mean",
    )
    bm.add_argument(
        "--router-init-std",
        type=float,
        help="the new routers' N(0, std) (default: the MoE config's model.init_method_std)",
    )
    bm.set_defaults(func=_btx_mix)
    br = btverbs.add_parser("run", help="run a BTX plan: seed, branches, mix, finetune, evaluation")
    br.add_argument("plan", help="BTX plan YAML (e.g. configs/btx/tiny.yaml)")
    br.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides of the plan; slurm.* "
        "and ray.* ones change the cluster profile",
    )
    br.add_argument("--backend", default="local", help="where branches run: local, slurm or ray")
    br.add_argument("--cluster", help="cluster profile YAML (SLURM, Ray)")
    br.add_argument("--runs", help="runs root directory (default $MOE_PARALLEL_RUNS or ./runs)")
    br.set_defaults(func=_btx_run)
    bs = btverbs.add_parser("status", help="every stage and branch of a BTX plan run")
    bs.add_argument("plan_run")
    bs.set_defaults(func=_btx_status)
    bz = btverbs.add_parser("resume", help="continue a plan run whose driver stopped or died")
    bz.add_argument("plan_run")
    bz.set_defaults(func=_btx_resume)

    pl = verbs.add_parser(
        "plan",
        help="parameters, FLOPs, memory per GPU; with --gpus N the "
        "layouts that fit N GPUs, fastest first",
    )
    pl.add_argument("config", help="the run's config, or `calibrate` to measure this machine")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.add_argument("--gpus", type=int, help="search the layouts of this many GPUs")
    pl.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory per GPU in GiB (default: the hardware profile's)",
    )
    pl.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    pl.add_argument(
        "--hardware",
        metavar="PROFILE",
        help="hardware profile YAML for the step time (default configs/hardware/h100_sxm.yaml; "
        "`moectl plan calibrate` writes one for this machine)",
    )
    pl.add_argument(
        "--overlap",
        default="",
        metavar="KINDS",
        help="communication Megatron overlaps, comma-separated: grad_reduce, param_gather, "
        "expert_comm (default none, as this project's runs)",
    )
    pl.add_argument("--out", metavar="PROFILE", help="calibrate: where to write the profile YAML")
    pl.add_argument(
        "--ranks", type=int, default=2, help="calibrate: ranks for the collectives (default 2)"
    )
    pl.set_defaults(func=_plan)

    gp = verbs.add_parser(
        "goodput",
        help="simulate failures at scale: ETTR, hours lost by cause, best checkpoint interval",
    )
    gp.add_argument("config")
    gp.add_argument("overrides", nargs="*")
    gp.add_argument("--gpus", type=int, required=True, help="cluster size")
    gp.add_argument("--days", type=float, required=True, help="wall-clock length of the run")
    gp.add_argument("--cluster", help="cluster profile YAML (storage.bandwidth_per_node_gb_s)")
    gp.add_argument("--rates", help="failure rates YAML (default: Llama 3's Table 5)")
    gp.add_argument("--interval", type=float, help="checkpoint interval in seconds to evaluate")
    gp.add_argument("--runs", type=int, default=1000, help="simulated runs (default 1000)")
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--backend", default="slurm", help="whose measured restart: slurm or ray")
    gp.add_argument(
        "--replacement-delay",
        type=float,
        default=600.0,
        help="seconds until a lost node is replaced",
    )
    gp.add_argument(
        "--pg-init-per-rank",
        type=float,
        default=0.003,
        help="process-group init seconds per rank (default 0.003, assumed: docs/goodput.md)",
    )
    gp.add_argument(
        "--spares",
        type=int,
        help="idle spare nodes that replace a lost node at once (default: the profile's "
        "slurm.spare_nodes, 0)",
    )
    gp.add_argument("--global-batch", type=int, help="global batch at this size (default: scaled)")
    gp.add_argument(
        "--recovery",
        choices=["restart", "elastic"],
        help="recovery.mode at this size (default: the config's)",
    )
    gp.add_argument("--plot", type=Path, help="write a PNG of ETTR vs interval and cluster size")
    gp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    gp.set_defaults(func=_goodput)

    cv = verbs.add_parser(
        "convert",
        help="Hugging Face <-> Megatron checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
        "PhiMoE, DeepSeek-V2/V3); the direction is read from SRC",
    )
    cv.add_argument(
        "src",
        help="a Hugging Face directory (config.json + weights), or one of our "
        "checkpoints (step, checkpoints or run directory)",
    )
    cv.add_argument(
        "out", help="new directory: run config + checkpoint, or a Hugging Face directory"
    )
    cv.add_argument(
        "overrides",
        nargs="*",
        help="HF -> Megatron: key=value overrides of the generated run config",
    )
    cv.add_argument(
        "--arch",
        help="Megatron -> HF: mixtral, qwen2_moe, phimoe, qwen3_moe, olmoe, deepseek_v3 or "
        "deepseek_v2 (default: the first that can express the model)",
    )
    cv.set_defaults(func=_convert)

    up = verbs.add_parser(
        "upcycle",
        help="dense checkpoint -> MoE checkpoint: sparse upcycling "
        "(experts = copies of the FFN) or, with --pesc, PESC adapter experts",
    )
    up.add_argument("src", help="a dense checkpoint of ours (step, checkpoints or run directory)")
    up.add_argument("out", help="new directory: run config + step-0 checkpoint")
    up.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the MoE run config (model.moe.*, parallel.*, train.*)",
    )
    up.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    up.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    up.add_argument(
        "--pesc",
        action="store_true",
        help="PESC / Camelidae: the FFN is shared, "
        "the experts are adapters on its output (only adapters and routers train)",
    )
    up.add_argument(
        "--router-init-std",
        type=float,
        help="the new routers' N(0, std) (default: the config's model.init_method_std)",
    )
    up.set_defaults(func=_upcycle)

    gn = verbs.add_parser(
        "generate",
        help="greedy generation from a checkpoint on local ranks "
        "(expert parallel over --ranks; serve.gating=dynamic|static)",
    )
    gn.add_argument("src", help="a run, checkpoints or step directory of ours")
    gn.add_argument(
        "overrides",
        nargs="*",
        help="serve.gating=static serve.capacity_factor=1.0, "
        "serve.expert_budget=N (expert buffering), serve.placement=auto|none|PATH, "
        "or run-config key=value overrides",
    )
    gn.add_argument("--prompt", required=True, help="the text to continue")
    gn.add_argument("--max-new-tokens", type=int, default=32)
    gn.add_argument("--logits", help="save each generated token's logits (torch .pt) here")
    _add_serve_flags(gn)
    gn.set_defaults(func=_generate)
    sc = verbs.add_parser(
        "score",
        help="mean next-token loss of each line of a file (batch "
        "evaluation; same options as generate)",
    )
    sc.add_argument("src", help="a run, checkpoints or step directory of ours")
    sc.add_argument("prompts", help="a text file, one prompt per line")
    sc.add_argument("overrides", nargs="*", help="serve.* or run-config key=value overrides")
    _add_serve_flags(sc)
    sc.set_defaults(func=_score)
    pl = verbs.add_parser(
        "placement",
        help="expert placement over EP ranks from a routing "
        "trace (arXiv 2303.06182's load balancing), saved as the checkpoint's "
        "placement.json; generate/score apply it (serve.placement=auto)",
    )
    pl.add_argument(
        "trace", help="a routing trace (.npz) from generate/score --trace or log.routing_trace"
    )
    pl.add_argument("src", help="the run, checkpoints or step directory it is for")
    pl.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks to serve on")
    pl.add_argument("--method", default="greedy", help="greedy (default) or anti_correlation")
    pl.add_argument("--out", help="write the placement here instead of into the checkpoint")
    pl.set_defaults(func=_placement)

    b = verbs.add_parser(
        "bench", help="step time, tokens/s and moectl's overhead over bare Megatron"
    )
    b.add_argument("config", nargs="?", default="configs/tiny/moe_tiny.yaml")
    b.add_argument("overrides", nargs="*")
    _add_paired_flags(b)
    b.set_defaults(func=_bench)
    dr = verbs.add_parser(
        "doctor",
        help="check this machine part by part: versions, a training step with MFU, the step "
        "clock, TE spec, FP8, async checkpoint save and load (GPU parts say when they need one)",
    )
    dr.add_argument("--runs", help="runs root for the checks' run directories (default ./runs)")
    dr.add_argument(
        "--layers", type=int, help="layers of the Mixtral-shaped stack (default: as many as fit)"
    )
    dr.set_defaults(func=_doctor)
    return p


def _add_peak_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak TFLOP/s of one GPU for MFU (default: "
        "the GPU's from a table; or $MOE_PARALLEL_PEAK_TFLOPS)",
    )


def _add_paired_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="time cap: stop measuring then even if the ratio's 95%% interval is still wider "
        "than the goal's margin (default 600)",
    )
    p.add_argument("--min-pairs", type=int, default=10, help="pairs measured at least (default 10)")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=1, help="local ranks = expert parallel size")
    p.add_argument("--trace", help="write the routing trace (.npz) here")
    p.add_argument("--runs", help="runs root for the job directory (default ./runs)")


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="refuse a layout the planner "
        "says needs more GiB per GPU (default: the GPU's memory with `train` on a GPU "
        "node, 80 for `submit` to GPU ranks; CPU ranks are not checked)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="launch even if the planner says the layout does not fit in GPU memory",
    )


def _train(args) -> int:
    from moe_parallel.launch_run import launch_local, plan_train
    from moe_parallel.plan.layouts import local_memory_check

    check = local_memory_check(args.gpu_memory, args.force)
    launch = plan_train(
        args.config, args.overrides, args.runs, args.resume, nproc=None, check=check
    )
    print(f"run directory: {launch.run_dir}", flush=True)
    code = launch_local(launch, threads_per_rank=args.threads_per_rank)
    print(
        f"run {'finished' if code == 0 else f'failed (exit {code})'}: {launch.run_dir}", flush=True
    )
    return code


def _finetune(args) -> int:
    from moe_parallel.finetune.launch import finetune_overrides

    args.overrides = finetune_overrides(args.config, args.overrides)
    args.resume = None
    return _train(args)


def _data_prepare(args) -> int:
    from cluster.typed_yaml import read_yaml_mapping
    from moe_parallel.config import load_config
    from moe_parallel.data import prepare

    if "domains" in read_yaml_mapping(args.config):  # a BTX plan: its tokenizer and domains
        from moe_parallel.btx.domains import prepare_domains
        from moe_parallel.btx.plan import load_plan

        print(
            json.dumps(prepare_domains(load_plan(args.config, args.overrides)).__dict__, indent=1)
        )
        return 0
    prepared = prepare(load_config(args.config, args.overrides).data)
    print(json.dumps(prepared.__dict__, indent=1, default=str))
    return 0


def _config(args) -> int:
    from moe_parallel.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    print(f"# ranks: {cfg.world_size}, micro-batches per step: {cfg.num_microbatches}")
    return 0


def _ckpt(action: str, args) -> int:
    from moe_parallel.ckpt import cli as ckpt_cli

    if action == "verify":
        return ckpt_cli.verify_command(args.target, args.step)
    return ckpt_cli.inspect_command(args.target, args.step, args.all)


def _submit(args) -> int:
    from moe_parallel.launch_run import load_submission, start_run
    from moe_parallel.plan.layouts import submit_memory_check

    overrides = list(args.overrides)
    for flag, key in (
        ("nodes", "slurm.nodes"),
        ("partition", "slurm.partition"),
        ("time", "slurm.time"),
        ("address", "ray.address"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    # The config and the cluster profile, each loaded once.
    submission = load_submission(args.config, overrides, args.cluster, args.backend, args.resume)
    submit_memory_check(
        submission.cfg, submission.backend.ranks_have_gpus, args.gpu_memory, args.force
    )  # before anything is created or queued
    done = start_run(submission, args.runs, args.threads_per_rank)
    print(f"run directory: {done.launch.run_dir}")
    print(
        f"submitted: {done.handle.backend} job {done.handle.job_ids[-1]} "
        f"({done.launch.cfg.world_size} ranks)",
        flush=True,
    )
    if not args.wait:
        print(
            f"follow it with: moectl status {done.launch.run_dir} | moectl logs {done.launch.run_dir} -f"
        )
        return 0
    code = done.backend.wait(done.handle)
    print(f"run {'finished' if code == 0 else f'failed (exit {code})'}: {done.launch.run_dir}")
    return code


def _status(args) -> int:
    from moe_parallel.views.status import print_status

    return print_status(
        Path(args.runs) if args.runs else None,
        Path(args.run_dir) if args.run_dir else None,
        args.peak_tflops,
    )


def _watch(args) -> int:
    from moe_parallel.views.watch import watch

    return watch(Path(args.run_dir), args.once, args.interval, args.peak_tflops)


def _plot(args) -> int:
    from moe_parallel.views.plots import plot_run

    for path in plot_run(Path(args.run_dir), Path(args.out) if args.out else None):
        print(path)
    return 0


def _dashboard(args) -> int:
    from moe_parallel.views.dashboard import serve

    return serve(
        Path(args.runs) if args.runs else None, args.port, args.host, args.refresh, args.peak_tflops
    )


def _logs(args) -> int:
    from cluster import RunLayout

    run_dir = Path(args.run_dir)
    path = RunLayout(run_dir).log(args.rank)
    if not args.follow:
        if not path.is_file():
            raise FileNotFoundError(f"no log for rank {args.rank}: {path}")
        sys.stdout.write(path.read_text())
        return 0
    return _follow(run_dir, path)


def _follow(run_dir: Path, path: Path) -> int:
    """Print the log, then what is appended, until the run reaches a terminal state."""
    import time

    from cluster import read_record
    from cluster.tail import LogStreamer
    from moe_parallel.views.summary import refreshed

    if path.is_file():
        sys.stdout.write(path.read_text())
    streamer = LogStreamer(path).start()
    try:
        while True:
            record, _ = refreshed(run_dir, read_record(run_dir))
            if record.status.terminal:
                break
            time.sleep(1.0)
    finally:
        streamer.stop()
    print(f"[run {record.status.value}]")
    return 0


def _cancel(args) -> int:
    from cluster import RunHandle, backend_for_run, read_record

    run_dir = Path(args.run_dir)
    record = read_record(run_dir)
    if record.status.terminal:
        print(f"run already {record.status.value}: {run_dir}")
        return 0
    # Set up as the run was submitted (a Ray run: the address it went to).
    backend_for_run(run_dir, record).cancel(RunHandle.of_run(run_dir, record))
    print(
        f"cancelled: {run_dir} (was {record.status.value}, jobs {', '.join(record.job_ids) or '-'})"
    )
    return 0


def _btx_mix(args) -> int:
    from moe_parallel.btx.mix_cli import mix_command

    return mix_command(
        args.dense,
        args.moe,
        args.checkpoints,
        args.runs,
        args.set,
        args.non_expert_from,
        args.router_init_std,
    )


def _btx_run(args) -> int:
    from cluster.profile import split_overrides
    from moe_parallel.btx.driver import start_plan

    plan_overrides, profile_overrides = split_overrides(args.overrides)
    plan_run, driver = start_plan(
        args.plan, plan_overrides, args.backend, args.cluster, profile_overrides, args.runs
    )
    print(f"plan run directory: {plan_run}", flush=True)
    return _drive(driver)


def _btx_resume(args) -> int:
    from moe_parallel.btx.driver import resume_plan

    return _drive(resume_plan(Path(args.plan_run)))


def _drive(driver) -> int:
    import signal

    def interrupt(signum, frame):  # unwinds, so local branches are cancelled and state saved
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        return driver.run()
    except KeyboardInterrupt:
        driver.end(
            "interrupted",
            f"the driver was stopped; continue with `moectl btx resume {driver.plan_run}`",
            130,
        )
        return 130
    except Exception as exc:  # recorded, so that `btx status` says why; then reported as usual
        driver.end(
            "failed",
            f"driver error: {exc}; after fixing it: `moectl btx resume {driver.plan_run}`",
            1,
        )
        raise


def _btx_status(args) -> int:
    from moe_parallel.btx.status import print_btx_status

    return print_btx_status(Path(args.plan_run))


def _goodput(args) -> int:
    from moe_parallel.goodput.costs import ScaleChoices
    from moe_parallel.goodput.report import GoodputRequest, format_goodput, goodput

    result = goodput(
        GoodputRequest(
            config=args.config,
            gpus=args.gpus,
            days=args.days,
            overrides=args.overrides,
            cluster=args.cluster,
            rates=args.rates,
            interval_s=args.interval,
            runs=args.runs,
            seed=args.seed,
            choices=ScaleChoices(
                args.gpus,
                args.backend,
                args.replacement_delay,
                args.pg_init_per_rank,
                spare_nodes=args.spares,
            ),
            global_batch_size=args.global_batch,
            recovery_mode=args.recovery,
            plot=args.plot,
        )
    )
    print(json.dumps(result, indent=2) if args.json else format_goodput(result))
    return 0


def _plan(args) -> int:
    if args.config == "calibrate":
        from moe_parallel.bench.calibrate import calibrate_command

        return calibrate_command(args.out, args.ranks)
    from moe_parallel.config import load_config
    from moe_parallel.plan.hardware import default_profile, load_profile, parse_overlap
    from moe_parallel.plan.params import describe

    hw = load_profile(args.hardware) if args.hardware else default_profile()
    overlap = parse_overlap(args.overlap)
    memory_gib = args.gpu_memory if args.gpu_memory is not None else hw.memory_gib
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size is None:  # the tokenizer decides: prepare (cached) to know it
        from moe_parallel.data import prepare

        cfg.model.vocab_size = prepare(cfg.data).vocab_size
    facts = describe(cfg)
    from moe_parallel.plan.report import plan_report

    if args.gpus is not None or args.json:
        return plan_report(cfg, facts, args.gpus, memory_gib, args.top, args.json, hw, overlap)
    print(
        f"{facts['name']}: {facts['total_params'] / 1e9:.3f}B parameters, "
        f"{facts['active_params'] / 1e9:.3f}B active per token "
        f"(embedding {facts['embedding_params'] / 1e9:.3f}B)"
    )
    if facts["mtp_params"]:
        print(
            f"multi-token prediction: {facts['mtp_params'] / 1e9:.3f}B more parameters, "
            "counted apart (embedding and output layer shared)"
        )
    print(
        f"training FLOPs: {facts['train_flops_per_token'] / 1e9:.2f} GFLOP per token, "
        f"{facts['train_flops_per_step'] / 1e15:.2f} PFLOP per step "
        f"({cfg.train.global_batch_size} x {cfg.model.seq_length} tokens)"
    )
    return plan_report(cfg, None, None, memory_gib, args.top, False, hw, overlap)


def _convert(args) -> int:
    from moe_parallel.convert.cli import convert_command

    return convert_command(args.src, args.out, args.arch, args.overrides)


def _upcycle(args) -> int:
    from moe_parallel.upcycle.cli import upcycle_command

    return upcycle_command(
        args.src,
        args.out,
        args.experts,
        args.top_k,
        args.pesc,
        args.router_init_std,
        args.overrides,
    )


def _generate(args) -> int:
    from moe_parallel.serve.cli import generate_command

    return generate_command(
        args.src,
        args.prompt,
        args.max_new_tokens,
        args.ranks,
        args.overrides,
        args.runs,
        args.trace,
        args.logits,
    )


def _placement(args) -> int:
    from moe_parallel.serve.cli import placement_command

    return placement_command(args.trace, args.src, args.ranks, args.method, args.out)


def _score(args) -> int:
    from moe_parallel.serve.cli import score_command

    return score_command(args.src, args.prompts, args.ranks, args.overrides, args.runs, args.trace)


def _bench(args) -> int:
    from moe_parallel.bench.common import run_benchmark

    return run_benchmark(args.config, args.overrides, [args.max_seconds, args.min_pairs])


def _doctor(args) -> int:
    from moe_parallel.bench.doctor import run_doctor

    return run_doctor(args.runs, args.layers)


if __name__ == "__main__":
    sys.exit(main())
