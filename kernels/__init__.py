"""Kernels for maskdsl: Triton code only; imports nothing of maskdsl."""
