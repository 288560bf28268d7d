"""Where does the variance of a dense feature map live: in where a location is, in which image it is, or in
what is there?

A research tool behind the measurements in docs/moco_hypercol.md and docs/byol_lead.md (no method or
evaluation script uses it; its tests are tests/test_diagnose.py).

DVE's regression head scores every location u of an image n with w . f(n, u) and takes a softmax over u. Split
each channel c of the features, over a set of images, the way a two-way analysis of variance does:

    f(n, c, u) = grand(c) + position(c, u) + image(n, c) + local(n, c, u)

position: the mean over images at location u, minus the grand mean (what a location looks like on average);
image:    the mean over locations of image n, minus the grand mean (one constant per image and channel);
local:    the rest (what differs at u in image n beyond those two).
The three parts are orthogonal, so their variances add up to the total. The softmax over locations ignores any
constant added to all locations of an image, so the head cannot use the image part at all: a network that
moves its variance there (e.g. to tell instances apart, which is what MoCo and BYOL are trained to do) leaves
less for the head to localise with. The position part alone predicts the same points in every image (the mean
shape); the local part is what lets a prediction follow the landmarks of one image.

For each extractor it prints, per channel group and for all channels, the share of the total variance in each
part, and the effective rank of the local part (exp of the entropy of its covariance's normalised eigenvalues:
how many directions it really uses).

With --out, it writes a copy of one extractor with its position part (measured on the --images training
images) subtracted at every location: the head then sees the same images without "where a location is on
average". A linear head with weights shared across locations cannot undo this, so regressing the copy tests
how much of a score the position part carries.

Run (one thread, ~1 min per 960-d hypercolumn on 64 images):
    python docs/diagnose_variance.py --features runs/moco_hypercol/random/hypercol.pt2 \
        runs/moco_hypercol/default/hypercol.pt2 runs/byol_lead/default/hypercol.pt2
    python docs/diagnose_variance.py --features runs/moco_hypercol/random/hypercol.pt2 \
        --out runs/moco_hypercol/random/hypercolnopos.pt2
then regress the copy with the same flags as the original (docs/moco_hypercol.md lists the commands).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from diagnose_scale import first_images, save_adjusted_copy  # noqa: E402


def position_part(features):
    """features (N, C, h, w) -> (C, h, w): the mean over images at each location minus the grand mean."""
    return features.mean(dim=0) - features.mean(dim=(0, 2, 3)).view(-1, 1, 1)


def variance_parts(features):
    """features (N, C, h, w) -> dict of summed-over-channels variances: total, position, image, local, and the
    local part itself as (N * h * w, C) for its spectrum."""
    d = features.double()  # one float64 copy (1.1 GB for 64 hypercolumns of 960 x 48 x 48)
    f = d.flatten(2)  # N x C x L, a view
    grand = f.mean(dim=(0, 2), keepdim=True)  # 1 x C x 1
    position = position_part(d).flatten(1).unsqueeze(0)  # 1 x C x L
    image = f.mean(dim=2, keepdim=True) - grand  # N x C x 1
    local = f - grand - position - image  # N x C x L
    parts = {"total": (f - grand).pow(2).mean(dim=(0, 2)).sum().item(),
             "position": position.pow(2).mean(dim=(0, 2)).sum().item(),
             "image": image.pow(2).mean(dim=(0, 2)).sum().item(),
             "local": local.pow(2).mean(dim=(0, 2)).sum().item()}
    return parts, local.transpose(1, 2).reshape(-1, f.shape[1])


def effective_rank(samples):
    """samples (M, C), already centred -> exp(entropy of the normalised eigenvalues of their covariance)."""
    eigenvalues = torch.linalg.eigvalsh(samples.T @ samples / len(samples)).clamp(min=0)
    p = eigenvalues / eigenvalues.sum()
    return torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", nargs="+", required=True, help="extractors (.pt2) to compare")
    parser.add_argument("--dataset", default="synth-faces", choices=list(data.DATASETS))
    parser.add_argument("--images", type=int, default=64, help="training images the variances are taken on")
    parser.add_argument("--out", default=None, help="write a copy of the (single) --features extractor with its "
                        "position part subtracted here (.pt2)")
    args = parser.parse_args(argv)
    if args.out and len(args.features) != 1:
        parser.error("--out needs exactly one --features file")
    torch.set_num_threads(1)
    print(f"{'features':44s} {'group':8s} {'channels':>8s} {'total':>9s} {'position':>8s} {'image':>6s} "
          f"{'local':>6s} {'rank local':>10s}")
    for path in args.features:
        extractor = data.load_extractor(path)
        images = first_images(args.dataset, extractor.meta["input_size"][0], args.images)
        with torch.no_grad():
            features = extractor(images).float()
        groups = extractor.meta["channel_groups"]
        rows = [(name, a, b) for name, a, b in groups]
        if len(groups) != 1:
            rows.append(("all", 0, features.shape[1]))
        for name, a, b in rows:
            parts, local = variance_parts(features[:, a:b])
            shares = [parts[key] / parts["total"] for key in ("position", "image", "local")]
            print(f"{path[-44:]:44s} {name:8s} {b - a:8d} {parts['total']:9.2f} {shares[0]:8.3f} {shares[1]:6.3f} "
                  f"{shares[2]:6.3f} {effective_rank(local):10.1f}")
    if args.out:
        position = position_part(features)  # C x h x w
        save_adjusted_copy(extractor, args.out, torch.ones(len(position)), position, "-nopos")
        print(f"wrote {args.out}: {path} minus its position part on {args.images} training images")


if __name__ == "__main__":
    main()
