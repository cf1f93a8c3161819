"""Weighted rendezvous (highest random weight) hashing: which shard holds a blob.

Every shard scores every key; the highest score wins. A shard's score for a key depends only on
the two of them, so adding or removing a shard moves only the keys that shard wins or won
(about weight / total weight of them), never keys between the other shards. Weights use the
logarithmic method: score = -weight / ln(u), with u in (0, 1) from a 64-bit hash, which makes
a shard win a share of keys proportional to its weight.

xxhash is fine here: the hash picks a place, it never names content (digests do that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

_TWO_64 = float(1 << 64)


@dataclass(frozen=True, slots=True)
class Shard:
    name: str
    weight: float = 1.0


def score(shard: Shard, key: bytes) -> float:
    h = xxhash.xxh64_intdigest(shard.name.encode() + b"\0" + key)
    u = (h + 0.5) / _TWO_64  # in (0, 1), never 0 or 1
    return -shard.weight / math.log(u)


def pick(shards: Sequence[Shard], key: bytes) -> int:
    """The index of the shard that owns `key` (shards with weight 0 own nothing)."""
    best, best_score = -1, -1.0
    for i, shard in enumerate(shards):
        if shard.weight <= 0:
            continue
        s = score(shard, key)
        if s > best_score:
            best, best_score = i, s
    if best < 0:
        raise ValueError("no shard has a positive weight")
    return best


def rank(shards: Sequence[Shard], key: bytes) -> list[int]:
    """Indexes of the shards with a positive weight, best owner of `key` first: where a key goes
    when its owner is down (the next one), stable like `pick`."""
    scored = [(score(s, key), i) for i, s in enumerate(shards) if s.weight > 0]
    return [i for _, i in sorted(scored, reverse=True)]
