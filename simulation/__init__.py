"""One machine standing in for a consortium: the five-population phantoms, the simulation runner,
the local deployment rehearsal and the benchmarks.

No real BraTS data can be downloaded in tests, demos or benchmarks, so
:mod:`fedbrats.simulation.phantoms` writes realistic synthetic cases in the BraTS 2023 layout;
they go through the same loading code as real site folders.
"""

# Imported as a top-level package (for example with the repository's root on sys.path):
if __name__ != "fedbrats.simulation":
    raise ImportError(
        f"this package is fedbrats.simulation, imported here as {__name__!r}: install the project "
        f"(pip install -e .) and import fedbrats.simulation"
    )
