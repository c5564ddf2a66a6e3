"""Quantizers trained in torch: k-means, product quantization, and IVF indexes filled from them."""
