"""How often DVE's random thin-plate splines fold, and how many face landmarks a fold hides (docs/protocol.md, 5).

    python docs/tps_folds.py      # about a minute on one CPU core; prints one line per measurement
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
lattice = data.identity_grid(49, 49).reshape(1, -1, 2)  # output points 2 px apart over the frame, at 96 px
for preset, nonrigid_scale in (("pair", 1.0), ("pair", 0.5), ("match", 1.0), ("single", 1.0)):
    warp = data.random_tps(1000, preset, g, nonrigid_scale=nonrigid_scale)
    folded = torch.linalg.det(warp.jacobian(lattice.expand(1000, -1, -1))).amin(1) < 0  # det J < 0 somewhere
    print(f"{preset} (non-rigid x{nonrigid_scale}): {100 * folded.float().mean():.1f}% of 1000 draws fold in the frame")
points = torch.rand(1000, 5, 2, generator=g) * 60 + 18  # face landmarks: the central 60 px of 96
for preset in ("pair", "match"):
    pair = data.tps_training_pair(torch.zeros(1000, 1, 96, 96), points, generator=g, preset=preset)
    lost = pair.points2.isnan().any(-1).float().mean()
    print(f"{preset} training pair: {100 * lost:.2f}% of 5,000 face landmarks are shown nowhere in image 2")
