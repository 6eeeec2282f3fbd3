"""The model's labels as a category tree: node probabilities, the leaf candidate, backoff.

A model is trained on its label set: every distinct labeled path, at any depth (a
coarse label such as ``Cell Phones`` is a label beside ``Cell Phones > Cases``). Its
softmax is over those labels. A node of the tree is a label or a prefix of one, and
its probability is the sum over the labels at or below it, so probabilities are
consistent with the tree: a parent is always at least as likely as any child, and
the roots sum to 1. A flat model is a tree of depth 1 and behaves as before.

Deciding a row:
- the **leaf candidate** is the most probable label under the most probable root (a
  coarse label, the root itself included, is a candidate like any other); its path
  runs from that root down to it. A walk from the root to the most probable child at
  each level was tried first: a child with many rare labels under it (Cell Phone
  Accessories) outweighs one likely label beside it (Unlocked Cell Phones), so the
  walk ended on unlikely leaves (docs/training.md, "Labels at any depth");
- **backoff** accepts the candidate's ancestors from the root down while each meets
  its level's threshold; the deepest accepted node is the answer, and a row whose
  root is not sure is for a person.

API:
    tree = LabelTree(labels)                       # labels: paths, columns of the softmax
    nodes = tree.node_probs(probs)                 # (n, len(tree.nodes))
    tops = tree.root_probs(probs)                  # (n, len(tree.root_names))
    decisions = tree.decide_rows(nodes, thresholds)  # thresholds[0] is level 1's
    decision = tree.decide(nodes[i], thresholds)     # one row
    decision.candidate, decision.accepted, decision.path_probs
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shelver.catalog.categories import SEPARATOR


def path_parts(path: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in path.split(SEPARATOR))


@dataclass(frozen=True)
class Decision:
    """One row's verdict on the tree."""

    # The deepest node the model would name, whatever its confidence.
    candidate: str
    # The deepest node on the candidate's path whose level was sure, or None.
    accepted: str | None
    # Probability of each node from the root to the candidate, in order.
    path_probs: tuple[float, ...]

    @property
    def accepted_level(self) -> int:
        """1 for a root, 0 when nothing was sure."""
        return 0 if self.accepted is None else len(path_parts(self.accepted))


class LabelTree:
    """The tree spanned by a model's label paths (see the module docstring)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = [SEPARATOR.join(path_parts(label)) for label in labels]
        parts = [path_parts(label) for label in self.labels]
        nodes = sorted({p[:d] for p in parts for d in range(1, len(p) + 1)})
        self.nodes = [SEPARATOR.join(n) for n in nodes]
        # Node path -> its column in ``node_probs``.
        self.node_index = {node: i for i, node in enumerate(self.nodes)}
        index = {n: i for i, n in enumerate(nodes)}
        self.depth = max((len(p) for p in parts), default=1)
        self.level = np.array([len(n) for n in nodes], dtype=np.int64)
        # The label column at each node, or -1 where a node is only a prefix.
        self.self_label = np.full(len(nodes), -1, dtype=np.int64)
        for k, p in enumerate(parts):
            self.self_label[index[p]] = k
        children: list[list[int]] = [[] for _ in nodes]
        self.roots = np.array([index[n] for n in nodes if len(n) == 1], dtype=np.int64)
        for n in nodes:
            if len(n) > 1:
                children[index[n[:-1]]].append(index[n])
        self.children = [np.array(c, dtype=np.int64) for c in children]
        # Each node's path of node ids from its root, and per depth the nodes there with
        # their parents: sorted paths keep siblings together, so one ``reduceat`` per
        # depth sums every node's children (``own_probs``).
        self._lineage = [[index[n[:d]] for d in range(1, len(n) + 1)] for n in nodes]
        self._depths = []
        for d in range(2, self.depth + 1):
            at = np.array([j for j, n in enumerate(nodes) if len(n) == d], dtype=np.int64)
            parents = np.array([index[nodes[j][:-1]] for j in at], dtype=np.int64)
            starts = np.flatnonzero(np.r_[True, parents[1:] != parents[:-1]])
            self._depths.append((at, parents[starts], starts))
        # Sorted paths keep every subtree contiguous: node j's descendants are nodes
        # j+1 .. j+size[j]-1. With the labels ordered by their node, the labels at or
        # below node j are one run, [lo[j], hi[j]), so a cumulative sum over the
        # ordered labels gives every node's probability with two gathers: O(n x (K +
        # nodes)) per batch, which 5,000 labels need (docs/training.md, "Cost at 5,000
        # categories").
        size = np.ones(len(nodes), dtype=np.int64)
        for j in range(len(nodes) - 1, -1, -1):
            if len(nodes[j]) > 1:
                size[index[nodes[j][:-1]]] += size[j]
        self._size = size
        label_node = np.array([index[p] for p in parts], dtype=np.int64)
        self._order = np.argsort(label_node, kind="stable")
        ordered = label_node[self._order]
        starts = np.arange(len(nodes), dtype=np.int64)
        self._lo = np.searchsorted(ordered, starts, side="left")
        self._hi = np.searchsorted(ordered, starts + size, side="left")

    def node_probs(self, probs: np.ndarray) -> np.ndarray:
        """(n, len(nodes)): each node's probability, summed over its labels at or below it."""
        probs = np.asarray(probs, dtype=np.float64)
        cumulative = np.zeros((len(probs), len(self.labels) + 1), dtype=np.float64)
        if len(probs):
            np.cumsum(probs[:, self._order], axis=1, out=cumulative[:, 1:])
        return cumulative[:, self._hi] - cumulative[:, self._lo]

    @property
    def root_names(self) -> list[str]:
        return [self.nodes[i] for i in self.roots]

    def root_probs(self, probs: np.ndarray) -> np.ndarray:
        """(n, len(roots)): the top-level distribution, columns in ``root_names`` order."""
        return self.node_probs(probs)[:, self.roots]

    def own_probs(self, node_probs: np.ndarray) -> np.ndarray:
        """(n, nodes): the probability of the label at each node itself (its node's
        probability less its children's), -inf where a node is only a prefix."""
        node_probs = np.asarray(node_probs, dtype=np.float64)
        below = np.zeros_like(node_probs)
        for at, parents, starts in self._depths:
            if len(at):
                below[:, parents] = np.add.reduceat(node_probs[:, at], starts, axis=1)
        return np.where(self.self_label >= 0, node_probs - below, -np.inf)

    def candidate_paths(self, node_probs: np.ndarray) -> list[list[int]]:
        """Per row of ``node_probs`` (n, nodes): node ids from the most probable root down
        to the leaf candidate, the most probable label in that root's subtree."""
        node_probs = np.asarray(node_probs, dtype=np.float64)
        root = self.roots[np.argmax(node_probs[:, self.roots], axis=1)]
        # A root's subtree is the run of nodes [root, root + size) (sorted paths).
        columns = np.arange(len(self.nodes))
        inside = (columns >= root[:, None]) & (columns < (root + self._size[root])[:, None])
        own = np.where(inside, self.own_probs(node_probs), -np.inf)
        return [self._lineage[int(j)] for j in np.argmax(own, axis=1)]

    def decide_rows(self, node_probs: np.ndarray, thresholds: Sequence[float]) -> list[Decision]:
        """Per row of ``node_probs`` (n, nodes): the leaf candidate and the deepest node of
        its path that meets its level's threshold, accepting from the root down (a level
        past ``thresholds`` is never accepted: nothing was measured there)."""
        node_probs = np.asarray(node_probs, dtype=np.float64)
        return [
            self._decision(path, row, thresholds)
            for path, row in zip(self.candidate_paths(node_probs), node_probs, strict=True)
        ]

    def decide(self, node_probs: np.ndarray, thresholds: Sequence[float]) -> Decision:
        """``decide_rows`` of one row of node probabilities."""
        return self.decide_rows(np.asarray(node_probs)[None, :], thresholds)[0]

    def _decision(
        self, path: list[int], node_probs: np.ndarray, thresholds: Sequence[float]
    ) -> Decision:
        probs = tuple(float(node_probs[i]) for i in path)
        accepted = None
        for level, (node, p) in enumerate(zip(path, probs, strict=True)):
            if level >= len(thresholds) or p < thresholds[level]:
                break
            accepted = self.nodes[node]
        return Decision(self.nodes[path[-1]], accepted, probs)
