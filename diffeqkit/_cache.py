"""A bounded, thread-safe LRU cache: compiled programs and traced functions are
kept per problem structure, and each entry holds its `f` alive, so the number
kept is bounded."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, KeysView
from typing import Any

__all__ = ["LRUCache"]


class LRUCache:
    """At most `size` entries; the least recently used one goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry for `key`, made by ``build()`` on first use."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item
        item = build()
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return item

    def keys(self) -> KeysView[Hashable]:
        return self._items.keys()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
