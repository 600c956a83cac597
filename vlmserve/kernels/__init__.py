"""Compute kernels, each beside a reference implementation in torch that its tests compare with."""
