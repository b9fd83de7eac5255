"""moe-parallel: Mixture-of-Experts pretraining on Megatron-core, from a YAML file to a run."""

__version__ = "0.1.0"
