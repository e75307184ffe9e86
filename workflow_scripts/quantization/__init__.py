"""Int8 quantization: round-to-nearest, GPTQ, and the streamed int8 checkpoint writer they share."""

# Samples per calibration forward pass in GPTQ. Here, free of torch, because the Snakefile sizes GPTQ's memory
# from it (planning/job_resources.py) and must not import torch to plan.
GPTQ_BATCH = 8
