"""Checkpoint I/O: Hugging Face folders, the Mistral tensor layout, streamed safetensors, GGUF sources, demo
presets, and the VACC modeling files a patched checkpoint carries."""
