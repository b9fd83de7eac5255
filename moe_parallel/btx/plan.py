"""A Branch-Train-MiX plan: seed -> one branch per domain -> mix -> MoE finetune -> evaluation.

A plan YAML names a dense seed config (or an existing seed checkpoint), the domains (name ->
text sources), branch and finetune settings (overrides of the seed's and the MoE's run configs),
and the mix settings. Every stage's run config is derived here, and :func:`check_plan` validates
all of them (the dense and MoE configs, expert count, widths) before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from cluster.typed_yaml import read_yaml_mapping, validate

from ..config import RunConfig, load_config
from ..data.corpus import BUILTIN_SOURCES


class PlanError(ValueError):
    """A plan that cannot run; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DomainSpec(_Strict):
    # The same sources as data.sources: built-in corpora or .txt/.jsonl paths.
    sources: list[str] = Field(min_length=1)
    max_bytes: Optional[PositiveInt] = None
    overrides: list[str] = Field(default_factory=list)  # this branch only (after branches.*)


class SeedSpec(_Strict):
    config: str  # dense run config; the seed is trained on all domains (their training splits)
    overrides: list[str] = Field(default_factory=list)
    # An existing dense checkpoint (e.g. a converted Llama-2-7B) instead of training a seed.
    checkpoint: Optional[str] = None


class BranchSpec(_Strict):
    # On top of the seed's config: each branch starts from the seed's weights.
    overrides: list[str] = Field(default_factory=list)
    # Local backend: the driver restarts a failed branch from its own checkpoint this many
    # times. SLURM and Ray restart inside the job (the cluster profile's max_restarts).
    max_restarts: int = Field(2, ge=0)


class MixSpec(_Strict):
    moe_config: str  # the mixed model: the seed's shape with model.moe, one expert per branch
    # The domains whose branches become experts, in expert order; None = every domain.
    experts: Optional[list[str]] = None
    # BTX-P section 4.1.1: the seed itself is kept as one more ("generalist") expert.
    seed_expert: bool = True
    top_k: Optional[PositiveInt] = None  # None = the MoE config's model.moe.top_k
    # Attention, norms, embeddings: the mean of the experts' models (BTX-P section 3.2) or the
    # seed's own.
    non_expert: Literal["mean", "seed"] = "mean"
    # The new routers: N(0, std); None = the MoE config's model.init_method_std.
    router_init_std: Optional[float] = Field(None, gt=0)
    # A branch that exhausted its restarts: "wait" stops before the mix (fix, then `btx
    # resume`); "proceed" mixes the branches that finished, with fewer experts, and says so.
    on_failed_branch: Literal["wait", "proceed"] = "wait"


class FinetuneSpec(_Strict):
    overrides: list[str] = Field(default_factory=list)  # on top of mix.moe_config


class EvalSpec(_Strict):
    batches: PositiveInt = 4  # global batches of each domain's validation split
    seed: int = 1234


class BtxPlan(_Strict):
    name: str = "btx"
    domains: dict[str, DomainSpec] = Field(min_length=1)
    # One tokenizer for every stage: a tokenizer.json (e.g. the seed's own), or None to train a
    # BPE of tokenizer_vocab_size on all domains.
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: PositiveInt = 4096
    split: str = "90,10,0"  # per domain: train, held-out (evaluation), test
    cache_dir: Optional[str] = None
    seed: SeedSpec
    branches: BranchSpec = Field(default_factory=BranchSpec)
    mix: MixSpec
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _names(self) -> "BtxPlan":
        bad = [d for d in self.domains if not d.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(
                f"domains: names {bad} must be letters, digits, '-' or '_' (they "
                "name run directories)"
            )
        return self

    @model_validator(mode="after")
    def _experts(self) -> "BtxPlan":
        unknown = [d for d in self.mix.experts or [] if d not in self.domains]
        if unknown:
            raise ValueError(
                f"mix.experts: {unknown} are not domains of the plan (domains: "
                f"{', '.join(self.domains)})"
            )
        if self.mix.experts is not None and len(set(self.mix.experts)) != len(self.mix.experts):
            raise ValueError(f"mix.experts={self.mix.experts} names a domain twice")
        return self

    @property
    def expert_domains(self) -> list[str]:
        return list(self.domains) if self.mix.experts is None else list(self.mix.experts)

    @property
    def expert_names(self) -> list[str]:
        """Expert order of the mixed model: the seed first (when kept), then the domains."""
        return (["seed"] if self.mix.seed_expert else []) + self.expert_domains


def load_plan(path: str | Path, overrides: list[str] = ()) -> BtxPlan:
    raw = read_yaml_mapping(path, PlanError)
    return validate(BtxPlan, raw, overrides, str(path), PlanError, what="BTX plan")


def dump_plan(plan: BtxPlan) -> str:
    import yaml

    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)


def absolute_paths(plan: BtxPlan) -> BtxPlan:
    """The plan with its file paths made absolute, so that it reads the same from any directory
    (the copy in the plan run directory is what `btx resume` uses)."""
    plan = plan.model_copy(deep=True)
    plan.seed.config = str(Path(plan.seed.config).resolve())
    plan.mix.moe_config = str(Path(plan.mix.moe_config).resolve())
    if plan.seed.checkpoint:
        plan.seed.checkpoint = str(Path(plan.seed.checkpoint).resolve())
    if plan.tokenizer:
        plan.tokenizer = str(Path(plan.tokenizer).expanduser().resolve())
    if plan.cache_dir:
        plan.cache_dir = str(Path(plan.cache_dir).expanduser().resolve())
    for domain in plan.domains.values():
        domain.sources = [
            s if s in BUILTIN_SOURCES else str(Path(s).expanduser().resolve())
            for s in domain.sources
        ]
    return plan


# ---------------------------------------------------------------------------------------------
# Stage configs: each is (config path, overrides), validated by check_plan
# ---------------------------------------------------------------------------------------------
def data_overrides(plan: BtxPlan, prefixes: list[str], tokenizer: str) -> list[str]:
    cache = [f"data.cache_dir={plan.cache_dir}"] if plan.cache_dir else []
    return [
        f"data.prefixes={_yaml_list(prefixes)}",
        f"data.tokenizer={tokenizer}",
        "data.blend_weights=null",
        f"data.split={plan.split}",
        *cache,
    ]


def seed_stage(plan: BtxPlan, prefixes: list[str], tokenizer: str) -> list[str]:
    return [
        *plan.seed.overrides,
        *data_overrides(plan, prefixes, tokenizer),
        f"name={plan.name}-seed",
    ]


def branch_stage(
    plan: BtxPlan, domain: str, prefix: str, tokenizer: str, seed_ckpt: str
) -> list[str]:
    return [
        *plan.seed.overrides,
        *plan.branches.overrides,
        *plan.domains[domain].overrides,
        *data_overrides(plan, [prefix], tokenizer),
        f"checkpoint.init_from={seed_ckpt}",
        f"name={plan.name}-{domain}",
    ]


def moe_stage(plan: BtxPlan, num_experts: int, prefixes: list[str], tokenizer: str) -> list[str]:
    """The mixed model's config (its experts may be fewer when a failed branch is skipped)."""
    moe = load_config(plan.mix.moe_config)
    top_k = min(plan.mix.top_k or moe.model.moe.top_k, num_experts)
    return [
        f"model.moe.num_experts={num_experts}",
        f"model.moe.top_k={top_k}",
        *data_overrides(plan, prefixes, tokenizer),
    ]


def finetune_stage(
    plan: BtxPlan, num_experts: int, prefixes: list[str], tokenizer: str, mixed_ckpt: str
) -> list[str]:
    return [
        *moe_stage(plan, num_experts, prefixes, tokenizer),
        *plan.finetune.overrides,
        *data_overrides(plan, prefixes, tokenizer),
        f"checkpoint.init_from={mixed_ckpt}",
        f"name={plan.name}-finetune",
    ]


def _yaml_list(items: list[str]) -> str:
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def check_plan(plan: BtxPlan) -> tuple[RunConfig, RunConfig]:
    """Every stage's config validates and fits the others; returns (seed config, MoE config).

    Placeholders stand for the prepared data (that exists only after preparation)."""
    fake = (["/nonexistent/prefix"], "/nonexistent/tokenizer.json")
    try:
        native = load_config(plan.mix.moe_config)
        if native.model.moe is None:
            raise PlanError(f"mix.moe_config={plan.mix.moe_config} needs a model.moe section")
        if native.model.moe.num_experts != len(plan.expert_names):
            raise PlanError(
                f"mix.moe_config has model.moe.num_experts={native.model.moe.num_experts}"
                f" but the plan makes {len(plan.expert_names)} experts "
                f"({', '.join(plan.expert_names)}): one per domain, plus the seed "
                "when mix.seed_expert is true"
            )
        if load_config(plan.seed.config).model.moe is not None:
            raise PlanError(f"seed.config={plan.seed.config} must be dense (no model.moe)")
        seed = load_config(plan.seed.config, seed_stage(plan, *fake))
        for domain in plan.domains:
            load_config(plan.seed.config, branch_stage(plan, domain, fake[0][0], fake[1], "/ckpt"))
        moe = load_config(plan.mix.moe_config, moe_stage(plan, len(plan.expert_names), *fake))
        load_config(
            plan.mix.moe_config, finetune_stage(plan, len(plan.expert_names), *fake, "/ckpt")
        )
    except PlanError:
        raise
    except ValueError as exc:
        raise PlanError(f"plan {plan.name}: {exc}") from exc
    if plan.mix.on_failed_branch == "proceed":  # the MoE may be built with fewer experts
        fewest = len(plan.expert_names) - len(plan.expert_domains) + 1
        for n in range(max(fewest, 1), len(plan.expert_names)):
            try:
                load_config(plan.mix.moe_config, finetune_stage(plan, n, *fake, "/ckpt"))
            except ValueError as exc:
                raise PlanError(
                    f"mix.on_failed_branch=proceed: without a branch the MoE has {n} "
                    f"experts, which its config does not allow: {exc}"
                ) from exc
    if moe.model.moe.expert_ffn_hidden_size != seed.model.ffn_hidden_size:
        raise PlanError(
            f"mix.moe_config: model.moe.expert_ffn_hidden_size="
            f"{moe.model.moe.expert_ffn_hidden_size} must equal the seed's "
            f"model.ffn_hidden_size={seed.model.ffn_hidden_size}"
        )
    shape = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "seq_length",
        "normalization",
        "activation",
        "position_embedding",
    )
    diffs = [k for k in shape if getattr(seed.model, k) != getattr(moe.model, k)]
    if diffs:
        raise PlanError(
            f"mix.moe_config differs from the seed in model.{', model.'.join(diffs)}: "
            "the mixed model must have the seed's shape"
        )
    if plan.mix.top_k is not None and plan.mix.top_k > len(plan.expert_names):
        raise PlanError(
            f"mix.top_k={plan.mix.top_k} is larger than the {len(plan.expert_names)} "
            "experts of the plan"
        )
    if plan.tokenizer is not None and not Path(plan.tokenizer).expanduser().is_file():
        raise PlanError(f"tokenizer={plan.tokenizer} does not exist")
    if plan.seed.checkpoint is not None and not Path(plan.seed.checkpoint).is_dir():
        raise PlanError(f"seed.checkpoint={plan.seed.checkpoint} is not a checkpoint directory")
    return seed, moe
