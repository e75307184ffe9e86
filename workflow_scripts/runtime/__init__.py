"""Running a model: the static prefill/decode graphs, the compiled AOTInductor packages and greedy decoding.

Compilation builds the packages, evaluation scores them and serving runs them, all through this package; none of
those three imports another.
"""
