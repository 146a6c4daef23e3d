"""Union-find over provisional IDs, run on the client; the equivalence table is small (border objects only)."""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets of integer IDs; the root of a set is its smallest ID, so results do not depend on order.

    A set can be *flagged* (here: it holds a watershed seed); `union(..., keep_flagged_apart=True)` refuses to
    join two flagged sets.
    """

    def __init__(self) -> None:
        self._parent: dict[int, int] = {}
        self._flagged: set[int] = set()

    def __len__(self) -> int:
        """Number of IDs that take part in some equivalence."""
        return len(self._parent)

    def find(self, x: int) -> int:
        """The root of `x`'s set (path halving)."""
        parent = self._parent
        if x not in parent:
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def flag(self, x: int) -> None:
        """Flag the set of `x`."""
        self._parent.setdefault(x, x)
        self._flagged.add(self.find(x))

    def is_flagged(self, x: int) -> bool:
        return self.find(x) in self._flagged

    def union(self, a: int, b: int, *, keep_flagged_apart: bool = False) -> bool:
        """Join the sets of `a` and `b`; return whether they were joined."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if keep_flagged_apart and ra in self._flagged and rb in self._flagged:
            return False
        root, child = (ra, rb) if ra < rb else (rb, ra)
        self._parent.setdefault(root, root)
        self._parent[child] = root
        if child in self._flagged:
            self._flagged.discard(child)
            self._flagged.add(root)
        return True

    def union_pairs(self, pairs: np.ndarray, *, keep_flagged_apart: bool = False) -> int:
        """Join every row (a, b) of `pairs` in sorted order; return how many joins happened."""
        joined = 0
        for a, b in np.unique(np.asarray(pairs, dtype=np.uint64).reshape(-1, 2), axis=0).tolist():
            joined += self.union(a, b, keep_flagged_apart=keep_flagged_apart)
        return joined

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """The root of every ID in `ids` (IDs never joined are their own root)."""
        ids = np.asarray(ids, dtype=np.uint64)
        if not self._parent:
            return ids.copy()
        keys = np.fromiter(self._parent.keys(), dtype=np.uint64, count=len(self._parent))
        values = np.array([self.find(int(k)) for k in keys.tolist()], dtype=np.uint64)
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
        pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
        return np.where(keys[pos] == ids, values[pos], ids)
