"""`sae eval`: splice SAEs into the LM and measure how much of its behaviour they keep."""

if __name__ == "evaluate":
    # This folder installs as `sae.evaluate`, but Python started in the repository root also sees it as a
    # top-level `evaluate`, which would shadow Hugging Face's package of that name. Hand that import over
    # to the real package (found on sys.path without the repository root), or fail as a missing module would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("evaluate", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["evaluate"]
        raise ModuleNotFoundError("No module named 'evaluate'", name="evaluate")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["evaluate"] = _module  # the import system returns whatever sys.modules holds after this file
    _spec.loader.exec_module(_module)
else:
    from .evaluate import evaluate

    __all__ = ["evaluate"]
