"""The merged view of an image's layers, by the OCI overlay rules (image-spec layer.md).

Lazy: nothing is precomputed for the whole image. A directory is the stack of same-named
directories in the layers that reach it (top first, cut at an opaque marker or at a layer
that replaced it with a non-directory); a name is looked up in that stack top-down, and
whiteouts hide what lies below them.

Inode numbers are derived, not allocated: ``(layer position + 1) << 40 | row id`` of the
topmost entry that provides the node (the canonical row for hardlinks, so a hardlink and its
target share an inode), with the image root fixed at 1. They are therefore the same on every
mount of the same image, whatever order files are visited in.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cachetools import LRUCache

from ..errors import NotFoundError
from .layer_index import ROOT_ID, Entry, LayerIndex

__all__ = ["MERGED_ROOT_INO", "OPAQUE_MARKER", "WHITEOUT_PREFIX", "MergedTree", "Node"]

MERGED_ROOT_INO = 1
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_LAYER_SHIFT = 40
CHILDREN_CACHE_ENTRIES = 500_000
FILE_NODE_CACHE = 65_536


@dataclass(frozen=True, slots=True)
class Node:
    """A name in the merged tree: the entry that provides it and, for a directory, the
    stack of (layer position, directory row) that contribute children, top first."""

    ino: int
    layer: int  # position of the providing layer, 0 = bottom
    entry: Entry
    sources: tuple[tuple[int, int], ...] = ()

    @property
    def is_dir(self) -> bool:
        return self.entry.is_dir


class MergedTree:
    """Overlay of ``layers`` (bottom first). With one layer it is that layer, unchanged."""

    def __init__(self, layers: Sequence[LayerIndex]) -> None:
        if not layers:
            raise NotFoundError("an image without layers has no filesystem")
        self.layers = list(layers)
        top = len(self.layers) - 1
        sources = []
        for pos in range(top, -1, -1):
            sources.append((pos, ROOT_ID))
            if self.layers[pos].lookup(ROOT_ID, OPAQUE_MARKER) is not None:
                break
        self.root = Node(MERGED_ROOT_INO, top, self.layers[top].get(ROOT_ID), tuple(sources))
        self._dirs: dict[int, Node] = {MERGED_ROOT_INO: self.root}
        self._nlink: dict[int, int] = {}
        # open() and getattr() of files come by inode: keep recent ones out of SQLite.
        self._files: LRUCache[int, Node] = LRUCache(maxsize=FILE_NODE_CACHE)
        # Bounded by the number of entries held, not of directories.
        self._children: LRUCache[int, list[Node]] = LRUCache(
            maxsize=CHILDREN_CACHE_ENTRIES, getsizeof=lambda nodes: max(len(nodes), 1)
        )

    # -- inode numbers -------------------------------------------------------------------

    def _ino(self, layer: int, entry: Entry) -> int:
        return ((layer + 1) << _LAYER_SHIFT) | entry.id

    def get(self, ino: int) -> Node:
        """The node of an inode number handed out earlier (by lookup/children)."""
        node = self._dirs.get(ino) or self._files.get(ino)
        if node is not None:
            return node
        layer, row = (ino >> _LAYER_SHIFT) - 1, ino & ((1 << _LAYER_SHIFT) - 1)
        if not 0 <= layer < len(self.layers):
            raise NotFoundError(f"no inode {ino}")
        entry = self.layers[layer].get(row)
        if entry.is_dir:
            # A directory not reached through lookup in this process: rebuild its stack.
            path = self.layers[layer].path_of(entry.name_id)
            found = self.resolve(path)
            if found is None or found.ino != ino:
                raise NotFoundError(f"no inode {ino}")
            return found
        node = self._files[ino] = Node(ino, layer, entry)
        return node

    # -- the overlay rules -------------------------------------------------------------

    def lookup(self, parent: Node, name: str) -> Node | None:
        """The child ``name`` of a merged directory, or None (absent or whited out)."""
        if not parent.is_dir or name.startswith(WHITEOUT_PREFIX):
            return None
        found: Node | None = None
        stack: list[tuple[int, int]] = []
        last = len(parent.sources) - 1
        whiteout = WHITEOUT_PREFIX + name
        for i, (pos, dir_row) in enumerate(parent.sources):
            layer = self.layers[pos]
            # One query for the name and its whiteout (a lookup is a FUSE round trip; the
            # programs' probes for missing names are most of them). The lowest layer's
            # whiteouts hide nothing.
            if i == last:
                entry, whited_out = layer.lookup(dir_row, name), False
            else:
                entry, whited_out = layer.lookup_with(dir_row, name, whiteout)
            if entry is not None:
                if found is None:
                    found = Node(self._ino(pos, entry), pos, entry)
                if not entry.is_dir or not found.is_dir:
                    break  # a non-directory hides everything below it
                stack.append((pos, entry.id))
                if layer.lookup(entry.id, OPAQUE_MARKER) is not None:
                    break  # opaque: lower layers' children are hidden
            if whited_out:
                break  # whited out for the layers below this one
        if found is None:
            return None
        if found.is_dir:
            found = Node(found.ino, found.layer, found.entry, tuple(stack))
            self._dirs[found.ino] = found
        return found

    def children(self, parent: Node) -> list[Node]:
        """The merged directory's entries, sorted by name, whiteouts applied.

        Cached (the image never changes): `find`, `ls -R` and link counting list the same
        directories again and again."""
        if not parent.is_dir:
            return []
        cached = self._children.get(parent.ino)
        if cached is None:
            cached = self._list(parent)
            if len(cached) <= CHILDREN_CACHE_ENTRIES:  # a bigger one would not fit: ValueError
                self._children[parent.ino] = cached
        return cached

    def _list(self, parent: Node) -> list[Node]:
        if len(parent.sources) == 1:
            pos, dir_row = parent.sources[0]
            out = []
            for entry in self.layers[pos].children(dir_row):
                if entry.name.startswith(WHITEOUT_PREFIX):
                    continue
                if entry.is_dir:
                    # One layer below: the child's stack is that layer's directory alone.
                    node = Node(self._ino(pos, entry), pos, entry, ((pos, entry.id),))
                    self._dirs[node.ino] = node
                else:
                    node = Node(self._ino(pos, entry), pos, entry)
                out.append(node)
            return out
        # Several layers: list each once, merge the sorted name streams, and apply the rules
        # of lookup() per name on those listings (not a query per name and layer: a merged
        # /usr/lib has thousands of names, and nlink() lists it on the first stat).
        listings = [
            (pos, {e.name: e for e in self.layers[pos].children(row)})
            for pos, row in parent.sources
        ]
        out = []
        last = None
        for name in heapq.merge(*(iter(kids) for _pos, kids in listings)):
            if name == last or name.startswith(WHITEOUT_PREFIX):
                continue
            last = name
            found: Node | None = None
            stack: list[tuple[int, int]] = []
            for pos, kids in listings:
                here = kids.get(name)
                if here is not None:
                    if found is None:
                        found = Node(self._ino(pos, here), pos, here)
                    if not here.is_dir or not found.is_dir:
                        break
                    stack.append((pos, here.id))
                    if self.layers[pos].lookup(here.id, OPAQUE_MARKER) is not None:
                        break
                if WHITEOUT_PREFIX + name in kids:
                    break
            if found is None:
                continue
            if found.is_dir:
                found = Node(found.ino, found.layer, found.entry, tuple(stack))
                self._dirs[found.ino] = found
            out.append(found)
        return out

    def nlink(self, node: Node) -> int:
        """Link count as a materialized filesystem reports it (dirs: 2 + subdirectories)."""
        if not node.is_dir:
            return node.entry.nlink
        if len(node.sources) == 1:
            return node.entry.nlink
        count = self._nlink.get(node.ino)
        if count is None:
            count = 2 + sum(1 for c in self.children(node) if c.is_dir)
            self._nlink[node.ino] = count
        return count

    # -- paths --------------------------------------------------------------------------

    def resolve(self, path: str) -> Node | None:
        """The node at an image path (symlinks are not followed)."""
        node: Node | None = self.root
        for part in (p for p in path.split("/") if p and p != "."):
            if node is None or part == "..":
                return None
            node = self.lookup(node, part)
        return node

    def walk(self, top: Node | None = None, prefix: str = "") -> Iterator[tuple[str, Node]]:
        """Every node below ``top`` as (path, node), depth first, in name order."""
        for child in self.children(top or self.root):
            path = prefix + child.entry.name
            yield path, child
            if child.is_dir:
                yield from self.walk(child, path + "/")

    def layer_of(self, node: Node) -> LayerIndex:
        return self.layers[node.layer]
