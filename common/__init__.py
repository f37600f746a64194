"""What the site and the server share: the data contract and BraTS I/O, networks, losses,
metrics, inference with a trained student, certificates and signing, and the command line.
"""

# Imported as a top-level package (for example with the repository's root on sys.path):
if __name__ != "fedbrats.common":
    raise ImportError(
        f"this package is fedbrats.common, imported here as {__name__!r}: install the project "
        f"(pip install -e .) and import fedbrats.common"
    )
