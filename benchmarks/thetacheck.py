"""θ calibrated on every second held-out row of a store (as the trainer does), θ-mode L0 on the others, beside
the EMA θ (docs/results.md, "Massive-row exclusion", table 3). `excl`: drop massive rows (norm > 3 × median) first.

    python benchmarks/thetacheck.py STORE SAE_DIR keep|excl [SAE_DIR keep|excl ...]
"""

import sys

import torch

from sae.rowtypes import row_norms
from sae.saedir import load_sae
from sae.store import Store
from sae.train.calibrate import calibrated_theta
from sae.train.reader import ChunkReader

store = Store.open(sys.argv[1])
site = store.sites[0]
with ChunkReader(store, site, batch_size=4096, val_chunks=2) as r:
    held = r.validation_rows(16384)
x = held.x.float()
median = store.norm_stats(site)["median"]
for d, excl in zip(sys.argv[2::2], sys.argv[3::2], strict=True):
    sae = load_sae(d)
    xs = x[row_norms(x) <= 3 * median] if excl == "excl" else x
    val, cal = xs[0::2][:8192], xs[1::2][:8192]
    with torch.no_grad():
        th = calibrated_theta(sae, cal, 32, torch.device("cpu"))
        ema = sae.cfg.metadata["theta_ema"]
        out = []
        for t in (th, ema):
            sae.threshold.data.fill_(t)
            l0c = (
                (torch.cat([sae.encode(cal[i : i + 2048]) for i in range(0, len(cal), 2048)]) > 0).float().sum(1).mean()
            )
            l0v = (
                (torch.cat([sae.encode(val[i : i + 2048]) for i in range(0, len(val), 2048)]) > 0).float().sum(1).mean()
            )
            out.append(f"θ={t:.4f}: L0 {l0c:.2f} on {len(cal)} calibration rows, {l0v:.2f} on {len(val)} other rows")
    print(f"{d}: calibrated {out[0]}; EMA {out[1]}")
