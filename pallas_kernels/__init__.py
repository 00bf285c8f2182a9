"""Pallas (and jax-triton) attention kernels.

Kernels never import attnjax; attnjax selects them with
`implementation='pallas'` / `'triton'`.
"""
