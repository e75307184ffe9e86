"""Compilation: vamc build configs and PyTorch AOTInductor graphs and packages."""
