"""The coordinating side of fedbrats: the Flower ServerApp (one function per phase), the strategy,
the round ledger, privacy accounting and the report.
"""

# Imported as a top-level package (for example with the repository's root on sys.path):
if __name__ != "fedbrats.server":
    raise ImportError(
        f"this package is fedbrats.server, imported here as {__name__!r}: install the project "
        f"(pip install -e .) and import fedbrats.server"
    )
