"""Draw the primitive pictures of the README (docs/images/*.png): ``python docs/make_pictures.py``.

Each picture shows a mask at N = 256 (left, allowed entries dark) and its 32 x 32 blocks
(right: full blue, partial orange, empty white), as ``maskdsl show --png`` draws them.
"""
from pathlib import Path

import torch

import maskdsl as md
from maskdsl import cli
from maskdsl.data import medusa_tree

N, BLOCK = 256, 32
OUT = Path(__file__).resolve().parent / "images"

PICTURES = {
    "full": md.Full(),
    "causal": md.Causal(),
    "window": md.Window(24),
    "dilated": md.Dilated(8, 4),
    "global": md.Global([0, 100, 200]),
    "document": md.Document([100, 60, 96]),
    "prefix": md.Prefix(64),
    "prefix_documents": md.Document([100, 60, 96]) & (md.Causal() | md.Prefix([40, 20, 30],
                                                                             documents=[100, 60, 96])),
    "tree": md.Tree(medusa_tree(3, 6)[:N]),
    "tensor": md.TensorMask(torch.rand(N, N, generator=torch.Generator().manual_seed(0)) < 0.02),
    "window_or_global": md.Window(24) | md.Global([0, 128]),
    "document_and_causal": md.Document([100, 60, 96]) & md.Causal(),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, mask in PICTURES.items():
        lay = mask.block_layout(N, N, block=(BLOCK, BLOCK))
        pooled = mask.to_dense(N, N).float()
        title = repr(mask) if not isinstance(mask, (md.Tree, md.TensorMask)) else (
            "Tree(medusa_tree(3, 6))" if isinstance(mask, md.Tree) else "TensorMask(torch.rand(256, 256) < 0.02)")
        cli._save_picture(str(OUT / f"{name}.png"), cli._short(title, 90), pooled, lay, dpi=60)
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()
