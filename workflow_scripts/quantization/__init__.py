"""Int8 quantization: round-to-nearest, GPTQ, and the streamed int8 checkpoint writer they share."""
