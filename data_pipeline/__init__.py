"""Sharded WebDataset data: writing shards and manifests, a resumable streaming reader, decoding and augmentation."""
