"""`sae harvest`: run a causal LM over a corpus and write activations into a Zarr v3 store."""
