"""``stargzfs pull``: materialize whole images on disk.

* :mod:`.pull` — orchestration: resolve, parallel verified downloads into the blob cache,
  rootfs extraction overlapping the downloads (bottom to top), layouts, atomic install.
* :mod:`.fetch` — one blob: cache hit (re-hashed), resume of a ``.partial`` with a Range
  request, segmented download (``--connections``), readable while it arrives.
* :mod:`.blob_cache` — ``<cache>/blobs/sha256/<hex>`` and ``<hex>.partial``.
* :mod:`.extract` — decompression (isal / zlib-ng / zlib, zstd; in a child process for big
  layers) and the safe layer applier (whiteouts, no symlink following, dir fds).
* :mod:`.layouts` — ``oci``, ``dir`` and ``docker-archive`` writers.
* :mod:`.progress` — live per-blob lines on a terminal, periodic plain lines otherwise.

Nothing is imported here, so ``stargzfs --help`` stays light.
"""
