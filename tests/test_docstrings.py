"""Every public name has a docstring (README "Guide"): the package's exports and their methods."""
from __future__ import annotations

import inspect

import maskdsl as md
from maskdsl import data, expr, preprocess, reorder, selfcheck


def _missing():
    out = []
    for mod in (md, md.reference, data, expr, preprocess, reorder, selfcheck):
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if (inspect.isclass(obj) or callable(obj) or inspect.ismodule(obj)) and not (obj.__doc__ or "").strip():
                out.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                for attr, f in vars(obj).items():
                    if not attr.startswith("_") and (callable(f) or isinstance(f, property)) \
                            and not (getattr(f, "__doc__", "") or "").strip():
                        out.append(f"{mod.__name__}.{name}.{attr}")
    return out


def test_public_names_have_docstrings():
    assert _missing() == []
