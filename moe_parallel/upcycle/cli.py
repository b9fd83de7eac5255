"""``moectl upcycle DENSE_CKPT OUT --experts E [--top-k K] [--pesc] [key=value ...]``.

Everything that can be checked without loading weights is checked first: the checkpoint is one
of ours and dense, the MoE config built from it validates (experts >= top-k, layout rules, ...),
the overrides leave the dense model's structure alone, OUT is new or empty. Then a 1-rank job of
the local backend (moe_parallel/upcycle/entry.py, its log in ``OUT/logs``) writes
``OUT/checkpoints/step_00000000``; ``OUT/config.yaml`` is the run config that trains from it
(``checkpoint.init_from``), in any layout: ``moectl train OUT/config.yaml parallel.expert=2``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from ..config.load import ConfigError

CHECKPOINT = Path("checkpoints") / "step_00000000"
# PESC's defaults: the paper (arXiv 2401.02731 App. B) and the released Camelidae configs.
PESC_DEFAULTS = {
    "expert_kind": "adapter",
    "adapter_dim": 512,
    "adapter_activation": "gelu",
    "moe_scaling": 0.25,
    "adapter_dropout": 0.1,
}


def upcycle_command(
    src: str,
    out: str,
    experts: int,
    top_k: int = 2,
    pesc: bool = False,
    router_init_std: float | None = None,
    overrides: list[str] = (),
    stream: bool = True,
) -> int:
    from ..ckpt.checkpoint import resolve_checkpoint

    source, target = Path(src), Path(out)
    if not source.is_dir():
        raise ConfigError(f"{src}: not a checkpoint directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{out}: the output directory exists and is not empty")
    if router_init_std is not None and router_init_std <= 0:
        raise ConfigError(f"--router-init-std={router_init_std}: must be > 0")
    checkpoint = resolve_checkpoint(source).resolve()
    dense, moe = upcycled_configs(checkpoint, target, experts, top_k, pesc, overrides)
    equal, why = output_preserved(moe)
    if not equal:
        print(f"moectl upcycle: note: {why}", file=sys.stderr, flush=True)
    from ..config import dump_config

    target.mkdir(parents=True, exist_ok=True)
    (target / "dense.yaml").write_text(dump_config(dense))
    kind = "PESC (adapter experts)" if pesc else "sparse upcycling"
    (target / "config.yaml").write_text(
        f"# {kind} of {checkpoint} ({experts} experts, top-{top_k}) by moectl upcycle.\n"
        "# Set train.* for your finetune; it starts from the upcycled weights (init_from).\n"
        + dump_config(moe)
    )
    code = _run_job(
        target,
        {
            "dense_checkpoint": str(checkpoint),
            "dense_config": str(target / "dense.yaml"),
            "moe_config": str(target / "config.yaml"),
            "out": str(target / "checkpoints"),
            "router_init_std": router_init_std,
            "equal_expected": equal,
        },
        stream,
    )
    if code == 0:
        print(
            f"upcycled {checkpoint} to {target / CHECKPOINT}; train from it with: "
            f"moectl train {target / 'config.yaml'}",
            flush=True,
        )
    return code


def upcycled_configs(
    checkpoint: Path, target: Path, experts: int, top_k: int, pesc: bool, overrides: list[str] = ()
):
    """(the dense run config, the MoE run config), both validated; raises ConfigError."""
    from ..ckpt.checkpoint import read_meta
    from ..config import config_from_dict

    meta = read_meta(checkpoint)
    raw = yaml.safe_load(meta["config"])
    dense = config_from_dict(raw, source=f"{checkpoint}/meta.json")
    if dense.model.moe is not None:
        raise ConfigError(
            f"{checkpoint} holds an MoE model (model.moe.num_experts="
            f"{dense.model.moe.num_experts}): upcycling starts from a dense "
            "checkpoint (model.moe: null)"
        )
    if experts < 1 or top_k < 1 or top_k > experts:
        raise ConfigError(f"--experts {experts} --top-k {top_k}: need 1 <= top-k <= experts")
    moe_section = {
        "num_experts": experts,
        "top_k": top_k,
        "expert_ffn_hidden_size": dense.model.ffn_hidden_size,
        "pre_softmax": False,
        "load_balancing": "aux_loss",
        "aux_loss_coeff": 0.01,
    }
    if pesc:
        moe_section.update(PESC_DEFAULTS)
    raw = dict(raw)
    raw["name"] = f"{dense.name}-{'pesc' if pesc else 'upcycled'}-{experts}x"
    raw["model"] = {**raw["model"], "moe": moe_section}
    raw["checkpoint"] = {
        **{
            k: v
            for k, v in (raw.get("checkpoint") or {}).items()
            if k not in ("init_from", "resume", "dir")
        },
        "init_from": str((target / CHECKPOINT).resolve()),
    }
    if pesc:
        raw["train"] = {**raw["train"], "trainable": "adapters_and_routers"}
    moe = config_from_dict(raw, overrides, source=f"upcycled {checkpoint}")
    changed = [
        k for k, v in dense.model.model_dump().items() if k != "moe" and getattr(moe.model, k) != v
    ]
    if changed:
        raise ConfigError(
            f"overrides change the dense model's structure ({', '.join(changed)}): "
            "the upcycled model keeps every dense field; only model.moe.* may change"
        )
    if moe.model.moe.expert_ffn_hidden_size != dense.model.ffn_hidden_size:
        raise ConfigError(
            f"model.moe.expert_ffn_hidden_size={moe.model.moe.expert_ffn_hidden_size}"
            f" must equal the dense ffn_hidden_size={dense.model.ffn_hidden_size}"
        )
    if not pesc and moe.model.moe.expert_kind != "ffn":
        raise ConfigError("model.moe.expert_kind=adapter is PESC: use moectl upcycle --pesc")
    return dense, moe


def output_preserved(cfg) -> tuple[bool, str]:
    """Whether the upcycled model's output equals the dense model's at initialisation, and why
    not. Identical experts (or identity adapters) give the dense FFN's output exactly when the
    routing weights of a token sum to 1 and no token is dropped."""
    moe = cfg.model.moe
    if moe.capacity_factor is not None:
        return False, (
            f"model.moe.capacity_factor={moe.capacity_factor} drops tokens over "
            "capacity: the upcycled model's output differs from the dense model's"
        )
    if moe.score_function == "softmax" and moe.pre_softmax and moe.top_k < moe.num_experts:
        return False, (
            "model.moe.pre_softmax=true: the top-k weights sum to less than 1, so the "
            "upcycled model's output is not the dense model's at initialisation "
            "(renormalised top-k, pre_softmax=false, keeps it)"
        )
    if moe.score_function == "sigmoid" and moe.top_k == 1:
        return False, "sigmoid top-1 weights are not 1: the output is scaled at initialisation"
    return True, ""


def _run_job(job_dir: Path, spec: dict, stream: bool) -> int:
    from cluster import RunSpec, run_local
    from moe_parallel.runtime.bootstrap import local_rank_preload

    (job_dir / "upcycle.json").write_text(json.dumps(spec, indent=1))
    code = run_local(
        RunSpec(
            job_dir,
            1,
            [sys.executable, "-m", "moe_parallel.upcycle.entry", str(job_dir)],
            preload=local_rank_preload(),
        ),
        stream=stream,
    )
    if code != 0:
        print(
            f"moectl upcycle: the upcycling job failed (exit {code}); its log: "
            f"{job_dir / 'logs' / 'rank0.log'}",
            file=sys.stderr,
            flush=True,
        )
    return code
