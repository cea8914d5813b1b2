"""The model and where it runs: loading and scratch presets (loading), the chunked loss (loss),
fast CPU kernels (fastpath), device and precision (device), processes (distributed), malloc.

Built on data/ only (IGNORE_INDEX, token dtype); never imports the run, evaluation or text.
"""
