"""Flower's entry into the app bundle: run the bundle's own copy of fedbrats.

``flwr run`` ships the project folder as an app bundle (FAB). In simulation and in deployment,
Flower unpacks it into ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/``, puts that folder
first on ``sys.path`` and imports the component module named in pyproject's
``[tool.flwr.app.components]`` (``flwr.supercore.object_ref.load_app``). The bundle holds the
project's folders (``common/``, ``client/``, ``server/``, ``simulation/``) at its root, while the
installed project imports them as ``fedbrats.common`` and so on. A component written as
``fedbrats.server.app:app`` would therefore be found on the host's installed copy, whatever
version that is, not in the bundle.

This module sits at the bundle's root, so Flower finds it there. It binds the package name
``fedbrats`` to the folder it lives in (every ``fedbrats.*`` import below then reads the bundle's
files) and hands Flower the apps on first access: ``serverapp`` in the ServerApp process and
``clientapp`` in each ClientApp process, so neither imports the other side's code. See
docs/architecture.md.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

__all__ = ["clientapp", "serverapp"]  # noqa: F822  (module __getattr__)

_HERE = str(Path(__file__).resolve().parent)


def _bind_package(bundle: str = _HERE) -> None:
    bound = sys.modules.get("fedbrats")
    if bound is not None:
        where = [str(Path(p).resolve()) for p in getattr(bound, "__path__", [])]
        if where == [bundle]:
            return
        loaded = sorted(m for m in sys.modules if m.startswith("fedbrats."))
        if loaded:
            raise ImportError(
                f"fedbrats is already imported from {where} ({', '.join(loaded[:3])}, ...); "
                f"this process cannot also run the app bundle in {bundle}"
            )
    package = types.ModuleType("fedbrats", "fedbrats, as shipped in this app bundle")
    package.__path__ = [bundle]
    package.__file__ = None
    sys.modules["fedbrats"] = package


def _clientapp(bundle: str):
    """The ClientApp of the bundle in folder ``bundle``.

    Flower's simulation engine loads the ClientApp once and pickles it to its Ray actors. Pickled
    as it is, its handlers would be found there by module name (``fedbrats.client.app``), that
    is on the host's installed copy. So the app pickles as a call of this function with the
    bundle's folder: each actor binds ``fedbrats`` to that same folder before it imports any of
    it. The folder is passed, not taken from this file, because an actor may import this small
    module from elsewhere on its path (Ray puts the driver's working directory first).
    """
    _bind_package(bundle)
    from fedbrats.client.app import app

    if getattr(app, "_fedbrats_bundle", None) != bundle:
        app.__class__ = type("BundleClientApp", (type(app),), {"__reduce__": _reduce_to_bundle})
        app._fedbrats_bundle = bundle
    return app


def _reduce_to_bundle(app) -> tuple:
    return (_clientapp, (app._fedbrats_bundle,))


def __getattr__(name: str):
    if name == "serverapp":
        _bind_package()
        from fedbrats.server.app import app

        return app
    if name == "clientapp":
        return _clientapp(_HERE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
