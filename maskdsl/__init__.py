"""maskdsl: exact attention under structured and arbitrary masks.

    import maskdsl as md
    mask = md.Window(256) | md.Global([0, 4096])
    out = md.attention(q, k, v, mask)
"""
from .masks import (  # noqa: F401
    And,
    Causal,
    Dilated,
    Document,
    Full,
    Global,
    Mask,
    Not,
    Or,
    Prefix,
    TensorMask,
    Tree,
    Window,
)
from .layout import BlockLayout  # noqa: F401
from . import reference  # noqa: F401
from .plan import Plan, prepare  # noqa: F401
from .attention import attention  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "And", "BlockLayout", "Causal", "Dilated", "Document", "Full", "Global", "Mask", "Not", "Or",
    "Plan", "Prefix", "TensorMask", "Tree", "Window", "attention", "prepare", "reference",
]
