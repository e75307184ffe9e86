"""Mistral-family checkpoints to VACC deployables: the work behind the Snakemake rules.

One module per stage; each stage module is also an entry point
(``python -m workflow_scripts.stages.<stage>``). Nothing here imports snakemake.
"""
