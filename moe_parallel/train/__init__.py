"""Training: the Trainer (``train/trainer.py``) and its step, batches, evaluation and metrics.

Nothing is imported here: ``train/entry.py`` must prepare the process (warning filters, CPU
adapter) before anything imports Megatron-core, and the views import ``train.metrics`` alone.
"""
