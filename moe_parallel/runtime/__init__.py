"""Process-level shims every rank process needs, below everything that builds models.

- :mod:`.bootstrap`: the one start-up of a rank process (:func:`~.bootstrap.start_rank`).
- :mod:`.cpu_adapter`: Megatron-core's CUDA calls rewritten for CPU ranks (gloo).
- :mod:`.megatron_import`: Megatron imported without Dynamo, Inductor and W&B.
- :mod:`.quiet`: filters for the warnings every CPU rank would print.
- :mod:`.distributed`: torch.distributed and Megatron's process groups from the rank environment.
- :mod:`.faults`: fault injection for tests (``MOE_PARALLEL_FAULT``).
"""
