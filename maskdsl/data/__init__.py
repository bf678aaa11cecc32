"""Data shipped with maskdsl: real example lengths for the packed-ALPACA workloads.

``alpaca_seed_lengths.csv`` holds the prompt and output token counts of the 175
seed tasks of tatsu-lab/stanford_alpaca (Apache-2.0; see this folder's
README.md for the source and the tokenisation). ``pack_alpaca`` packs them into
one sequence the way the Binary Block Masking paper's packed-finetuning masks
do:

    >>> import maskdsl as md
    >>> from maskdsl.data import pack_alpaca
    >>> lens, prompts = pack_alpaca(4096)
    >>> sequential = md.Document(lens) & md.Causal()
    >>> bidirectional = md.Document(lens) & (md.Causal() | md.Prefix(prompts, documents=lens))
"""
from __future__ import annotations

import csv
import functools
import random
from pathlib import Path

__all__ = ["ALPACA_CSV", "alpaca_lengths", "medusa_tree", "pack_alpaca"]

ALPACA_CSV = Path(__file__).parent / "alpaca_seed_lengths.csv"


@functools.lru_cache(maxsize=1)
def _read_alpaca() -> tuple[tuple[int, int], ...]:
    with ALPACA_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return tuple((int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows)


def alpaca_lengths() -> list[tuple[int, int]]:
    """The (prompt_tokens, output_tokens) of every example, in file order.

    175 examples, 17,651 tokens in all (prompt = instruction + input).
    """
    return list(_read_alpaca())


def pack_alpaca(n: int, *, seed: int | None = None) -> tuple[list[int], list[int]]:
    """Pack ALPACA examples into one sequence of ``n`` tokens.

    Each example becomes one document: its prompt tokens, then its output tokens.
    Examples are taken in file order, or, when ``seed`` is given, in a shuffled
    order drawn from ``random.Random(seed)`` (a fresh shuffle for every pass
    over the file, so the result depends only on ``n`` and ``seed``). Packing
    stops at the first example that does not fit in the tokens left; for ``n``
    above the file's 17,651 tokens it cycles through the file again. Tokens
    left over at the end belong to no document.

    Args:
        n: length of the packed sequence, >= 0.
        seed: None for file order, else the seed of the shuffle.

    Returns:
        (doc_lengths, prompt_lengths): per document, its total length and the
        length of its prompt; ``sum(doc_lengths) <= n``. Ready for
        ``md.Document(doc_lengths)`` and
        ``md.Prefix(prompt_lengths, documents=doc_lengths)``.

    Example:
        >>> pack_alpaca(100)
        ([94], [28])
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"pack_alpaca: n must be an integer, got {n!r}")
    if n < 0:
        raise ValueError(f"pack_alpaca: n must be >= 0, got {n}")
    examples = _read_alpaca()
    rng = random.Random(seed) if seed is not None else None
    docs: list[int] = []
    prompts: list[int] = []
    left = n
    while True:
        order = list(range(len(examples)))
        if rng is not None:
            rng.shuffle(order)
        for idx in order:
            prompt, output = examples[idx]
            if prompt + output > left:
                return docs, prompts
            docs.append(prompt + output)
            prompts.append(prompt)
            left -= prompt + output


def medusa_tree(heads: int, candidates: int) -> list[int]:
    """Parents of a complete tree of depth ``heads`` and branching ``candidates`` without
    its root, in BFS order (MEDUSA's candidate layout): nodes 0..candidates-1 are roots
    (parent -1), then their children. The paper's MEDUSA 5x5 and 8x3 trees have 3905 and
    9840 nodes."""
    parents: list[int] = []
    level = [-1]
    for _ in range(heads):
        nxt = []
        for p in level:
            for _ in range(candidates):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    return parents
