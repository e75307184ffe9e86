"""Entry points, one per stage: ``python -m workflow_scripts.stages.<stage>``.

A stage imports libraries, never another stage, so that its code inputs are the code it runs.
"""
