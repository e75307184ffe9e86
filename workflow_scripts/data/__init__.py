"""Calibration and evaluation text: dataset files, their readers, tokenizers and fixed-length token windows."""
