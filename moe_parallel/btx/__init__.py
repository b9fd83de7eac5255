"""Branch-Train-MiX (Sukhbaatar et al., 2024, arXiv 2403.07816): dense branches mixed into an MoE."""
