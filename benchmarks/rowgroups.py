"""FVU / NMSE / L0 (θ mode) of SAEs on a store's held-out chunks (never trained on), by row type (docs/results.md,
"Massive-row exclusion", table 1).

    python benchmarks/rowgroups.py STORE SAE_DIR [SAE_DIR ...]
"""

import sys

import torch

from sae.rowtypes import row_norms
from sae.saedir import load_sae
from sae.store import Store
from sae.train.reader import ChunkReader

store = Store.open(sys.argv[1])
site = store.sites[0]
with ChunkReader(store, site, batch_size=4096, val_chunks=2) as r:
    held = r.validation_rows()
x = held.x.float()
median = store.norm_stats(site)["median"]
norm = row_norms(x)
groups = {"typical": norm <= 3 * median, "massive": norm > 3 * median, "all": torch.ones(len(x), dtype=torch.bool)}
xbar = store.stats(site, skip_bos=True).mean
print(f"{len(x)} held-out rows, {int(groups['massive'].sum())} massive (norm > 3 × median {median:.1f})")
print("| SAE | rows | FVU | NMSE | L0 | share of active latents |")
print("|---|---|---:|---:|---:|---:|")
for d in sys.argv[2:]:
    sae = load_sae(d)
    with torch.no_grad():
        a = torch.cat([sae.encode(x[i : i + 2048]) for i in range(0, len(x), 2048)])
        xh = torch.cat([sae.decode(a[i : i + 2048]) for i in range(0, len(x), 2048)])
    l0 = (a > 0).float().sum(1)
    for g, m in groups.items():
        err = ((x[m] - xh[m]) ** 2).sum()
        fvu = err / ((x[m] - x[m].mean(0)) ** 2).sum()
        nmse = err / (x[m] ** 2).sum()
        print(
            f"| {d} | {g} ({int(m.sum())}) | {fvu:.3f} | {nmse:.3f} | {l0[m].mean():.1f} "
            f"| {l0[m].sum() / l0.sum():.1%} |"
        )
