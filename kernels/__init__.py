"""Triton kernels and their PyTorch references (installed as `hybridrag.kernels`; depends on torch and triton only).

Triton is imported only by the modules that hold Triton code, so the references and CPU paths work without it.
"""
