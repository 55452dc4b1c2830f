"""The ``sdpa`` backend: torch's own ``scaled_dot_product_attention``, so ``backend="auto"`` can route a call to
the kernels torch ships (cuDNN, flash, memory-efficient on CUDA; its fused CPU kernel) where they win."""
