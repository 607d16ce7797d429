"""INT8 matmul: quantization, the dequantize-then-matmul reference, the CPU path on PyTorch's int8 kernels and the
Triton kernels (`triton_kernels`)."""
from .cpu import int8_matmul_cpu, int8_matmul_grad_input_cpu
from .quantize import INT8_MAX, MAX_INT8_REDUCTION, dequantize_weight, quantize_activations, quantize_weight
from .reference import int8_matmul_reference

__all__ = ["INT8_MAX", "MAX_INT8_REDUCTION", "quantize_weight", "dequantize_weight", "quantize_activations",
           "int8_matmul_reference", "int8_matmul_cpu", "int8_matmul_grad_input_cpu"]
