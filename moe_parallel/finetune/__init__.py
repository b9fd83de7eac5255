"""Instruction finetuning (Flan-MoE, arXiv 2305.14705): prompt/response data packed with a
response-only loss (``packing``), the instruction sources (``instructions``), and the MoE
finetuning options applied to the model (``moe_options``: frozen routers/experts, expert
dropout). The run config's ``finetune`` section (config/finetune.py) switches a run to it.

Importing this package stays cheap: submodules import torch/Megatron themselves.
"""
