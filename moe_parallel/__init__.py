"""moe-parallel: Mixture-of-Experts pretraining on Megatron-core, from a YAML file to a run."""

from moe_parallel.runtime.megatron_import import install as _install_megatron_import

_install_megatron_import()  # Megatron's import without Dynamo, Inductor and W&B (see there)

__version__ = "0.1.0"
