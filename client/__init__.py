"""The site side of fedbrats: the Flower ClientApp and the plain functions it calls (teacher,
distillation round, site evaluation).
"""

# Imported as a top-level package (for example with the repository's root on sys.path):
if __name__ != "fedbrats.client":
    raise ImportError(
        f"this package is fedbrats.client, imported here as {__name__!r}: install the project "
        f"(pip install -e .) and import fedbrats.client"
    )
