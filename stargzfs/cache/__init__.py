"""Caches: verified chunks (memory LRU + content-addressed disk store)."""

from .chunk_cache import CacheStats, ChunkCache

__all__ = ["CacheStats", "ChunkCache"]
