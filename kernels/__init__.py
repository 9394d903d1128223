"""Triton kernels (installed as detr_fast.kernels): @triton.jit functions and their launch helpers only.

Importing this package imports triton; detr_fast.ops imports it only on the paths that launch a kernel.
"""
