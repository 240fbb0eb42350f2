"""Fused Triton kernels for diffusers-srpo, installed as ``diffusers_srpo.kernels``.

The PyTorch functions in ``diffusers_srpo.ops`` are the specification; kernels here only
ever run on CUDA tensors.
"""
