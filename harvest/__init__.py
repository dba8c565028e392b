"""`sae harvest`: run a causal LM over a corpus and write activations into a Zarr v3 store."""

from .loop import compute_shard, harvest, harvest_shards, resolve_sites, shard_task, summary

__all__ = ["compute_shard", "harvest", "harvest_shards", "resolve_sites", "shard_task", "summary"]
