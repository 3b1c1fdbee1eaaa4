"""fc1's inputs at the exp14 step's shapes, shared by bench_bias_gelu.py and bench_linear.py.

Rows: the tokens one exp14 microbatch sends through a block at p=4, hw_p=6 (two views): about
8200 (nano, B=16), 4340 (tiny, B=8) and 2050 (base_shallow_decoder, B=4); hidden = 4·D.
"""

import torch

CASES = {"nano": (8192, 128), "tiny": (4340, 192), "base": (2048, 768)}  # rows, D


def fc1_inputs(size: str):
    """(x [M, D], W1 [4D, D], b1 [4D], grad [M, 4D]), fixed seed; x, W1, b1 require grad."""
    m, d = CASES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g, requires_grad=True)
    w = (torch.randn(4 * d, d, generator=g) / d ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(4 * d, generator=g)).requires_grad_()
    return x, w, b, torch.randn(m, 4 * d, generator=g)
