"""``moectl btx mix``: branch checkpoints -> one MoE checkpoint, run as a 1-rank job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cluster import RunSpec, new_run_dir, run_local

from ..config import RunConfig, dump_config, load_config
from ..config.load import ConfigError
from ..runtime.bootstrap import local_rank_preload


def mix_command(
    dense_config: str,
    moe_config: str,
    checkpoints: list[str],
    runs_root: str | None,
    overrides: list[str],
    non_expert_from: str | None = None,
    router_init_std: float | None = None,
) -> int:
    """Check everything, then mix in a fresh run directory; prints where the checkpoint is."""
    dense = load_config(dense_config, overrides)
    moe = load_config(moe_config, overrides)
    check_mix(dense, moe, checkpoints)
    if non_expert_from and not Path(non_expert_from).is_dir():
        raise FileNotFoundError(f"--non-expert-from {non_expert_from}: not a checkpoint directory")
    if router_init_std is not None and router_init_std <= 0:
        raise ConfigError(f"--router-init-std={router_init_std}: must be > 0")
    run_dir = new_run_dir(Path(runs_root) if runs_root else None, f"btx-mix-{moe.name}")
    print(f"run directory: {run_dir}", flush=True)
    if non_expert_from:
        non_expert_from = str(Path(non_expert_from).resolve())
    code = run_mix_job(
        dense,
        moe,
        checkpoints,
        run_dir,
        non_expert_from=non_expert_from,
        router_init_std=router_init_std,
    )
    if code == 0:
        print(
            f"mixed checkpoint: {run_dir / 'checkpoints' / 'step_00000000'} (finetune with "
            f"checkpoint.init_from=<that path>)"
        )
    return code


def check_mix(dense: RunConfig, moe: RunConfig, checkpoints: list[str]) -> None:
    if dense.model.moe is not None:
        raise ConfigError(f"{dense.name}: the branches' config must be dense (model.moe: null)")
    if moe.model.moe is None:
        raise ConfigError(f"{moe.name}: the mixed model's config needs a model.moe section")
    if moe.model.moe.num_experts != len(checkpoints):
        raise ConfigError(
            f"{len(checkpoints)} branch checkpoints given but {moe.name} has "
            f"model.moe.num_experts={moe.model.moe.num_experts}: one expert per branch"
        )
    if moe.model.moe.expert_ffn_hidden_size != dense.model.ffn_hidden_size:
        raise ConfigError(
            f"model.moe.expert_ffn_hidden_size={moe.model.moe.expert_ffn_hidden_size} "
            f"must equal the branches' ffn_hidden_size={dense.model.ffn_hidden_size}"
        )
    missing = [c for c in checkpoints if not Path(c).is_dir()]
    if missing:
        raise FileNotFoundError(f"not checkpoint directories: {', '.join(missing)}")


def run_mix_job(
    dense: RunConfig,
    moe: RunConfig,
    checkpoints: list[str],
    run_dir: Path,
    stream: bool = True,
    non_expert_from: str | None = None,
    router_init_std: float | None = None,
) -> int:
    """The mix as a 1-rank local run in ``run_dir`` (checked with :func:`check_mix` first);
    the checkpoint is its step 0."""
    (run_dir / "dense.yaml").write_text(dump_config(dense))
    (run_dir / "moe.yaml").write_text(dump_config(moe))
    (run_dir / "config.yaml").write_text(dump_config(moe))
    (run_dir / "mix.json").write_text(
        json.dumps(
            {
                "dense_config": str(run_dir / "dense.yaml"),
                "moe_config": str(run_dir / "moe.yaml"),
                "experts": [str(Path(c).resolve()) for c in checkpoints],
                "out": str(run_dir / "checkpoints"),
                "non_expert_from": non_expert_from,
                "router_init_std": router_init_std,
            },
            indent=1,
        )
    )
    return run_local(
        RunSpec(
            run_dir,
            1,
            [sys.executable, "-m", "moe_parallel.btx.mix_entry", str(run_dir)],
            preload=local_rank_preload(),
        ),
        stream=stream,
    )
