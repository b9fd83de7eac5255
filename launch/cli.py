"""``moectl``: the command line. Each verb parses its arguments and calls into the packages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear message, no traceback
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
    t.set_defaults(func=_train)

    d = verbs.add_parser("data", help="data preparation")
    dverbs = d.add_subparsers(metavar="ACTION")
    prep = dverbs.add_parser("prepare", help="tokenize the config's sources into .bin/.idx")
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

    s = verbs.add_parser("status", help="runs and their state")
    s.add_argument("--runs", help="runs root directory")
    s.set_defaults(func=_status)

    lg = verbs.add_parser("logs", help="print a rank's log of a run")
    lg.add_argument("run_dir")
    lg.add_argument("--rank", type=int, default=0)
    lg.set_defaults(func=_logs)

    b = verbs.add_parser("bench", help="step time, tokens/s and moectl's overhead over bare Megatron")
    b.add_argument("config", nargs="?", default="configs/tiny/moe_tiny.yaml")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--repeats", type=int, default=5)
    b.set_defaults(func=_bench)
    return p


def _train(args) -> int:
    from moe_parallel.launch_run import launch_local, plan_train

    launch = plan_train(args.config, args.overrides, args.runs, args.resume, nproc=None)
    print(f"run directory: {launch.run_dir}", flush=True)
    code = launch_local(launch, threads_per_rank=args.threads_per_rank)
    print(f"run {'finished' if code == 0 else f'failed (exit {code})'}: {launch.run_dir}",
          flush=True)
    return code


def _data_prepare(args) -> int:
    from moe_parallel.config import load_config
    from moe_parallel.data import prepare

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


def _status(args) -> int:
    from moe_parallel.status import print_status

    return print_status(Path(args.runs) if args.runs else None)


def _logs(args) -> int:
    from cluster import RunLayout

    path = RunLayout(Path(args.run_dir)).log(args.rank)
    if not path.is_file():
        raise FileNotFoundError(f"no log for rank {args.rank}: {path}")
    sys.stdout.write(path.read_text())
    return 0


def _bench(args) -> int:
    from moe_parallel.bench import run_benchmark

    return run_benchmark(args.config, args.overrides, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
