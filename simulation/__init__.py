"""Synthetic BraTS-style data: five-population brain-tumour phantoms, their rendering and CLI.

No real BraTS data can be downloaded in tests, demos or benchmarks, so :mod:`simulation.phantoms`
writes realistic synthetic cases in the BraTS 2023 layout; they go through the same loading code
as real site folders.
"""
