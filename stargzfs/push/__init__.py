"""The write side: pushing local images, converting images to eStargz, copying and deleting.

* :mod:`.upload`: the registry upload protocol (HEAD skip, cross-repository mount, chunked
  resumable PATCH or monolithic PUT, manifests, deletes) over a shared ``RegistryClient``;
* :mod:`.sources`: ``docker-archive:``, ``oci:`` and ``dir-rootfs:`` sources;
* :mod:`.pusher`: pushing a local image, blobs in parallel, manifests last;
* :mod:`.convert`: whole-image conversion to eStargz / zstd:chunked;
* :mod:`.copy`: registry to registry, manifests verbatim;
* :mod:`.delete`: delete by reference, prune by age.
"""
