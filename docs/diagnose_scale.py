"""Does a hypercolumn regress worse because of what it contains, or because of how large its features are?

A research tool behind the measurements in docs/moco_hypercol.md and docs/byol_lead.md (no method or
evaluation script uses it; its tests are tests/test_diagnose.py).

DVE's regressor starts from N(0, 1) weights and takes a spatial softmax of 100 x (weights . feature): with
960-d features whose norm is ~40, its softmaxes start as hard arg-maxes, and a short run spends its steps
shrinking them. Two extractors with the same information but different feature norms can then score
differently after a short regression. This script separates the two:

* it prints, per channel group (the hypercolumn's layers), the mean feature norm per location and the mean
  spatial standard deviation per channel of each extractor, on --images training images of --dataset;
* with --out, it writes a copy of --features whose groups are each multiplied by one scalar so that their mean
  norms equal --reference's, or, with --equal-norm N instead, all equal N / sqrt(groups) (a whole location's
  vector then has a mean norm of about N: e.g. a hypercolumn at the scale of one of its layers). Either is a
  block-diagonal rescaling, which a linear head can undo exactly: the copy holds the same information at
  another scale.

Run (one thread, ~20 s):
    python docs/diagnose_scale.py --reference runs/moco_hypercol/random/hypercol.pt2 \
        --features runs/moco_hypercol/default/hypercol.pt2 --out runs/moco_hypercol/default/hypercolnorm.pt2
then regress the copy with the same flags as the original (docs/moco_hypercol.md lists the commands). A hypercolumn at
the scale of its own layer1 (the layer1 norm that the first command prints, here for the wild faces' run):
    python docs/diagnose_scale.py --features runs/moco_hypercol/wild/hypercol.pt2 --dataset synth-faces-wild \
        --equal-norm 12.68 --out runs/moco_hypercol/wild/hypercoleq.pt2
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


class Adjusted(nn.Module):
    """An extractor followed by a fixed per-channel multiplier and a fixed map subtracted: features * scale - shift
    (scale (C,), shift (C, h, w) or (C, 1, 1)); the copies these diagnostics write."""

    def __init__(self, extractor_module, scale, shift):
        super().__init__()
        # a plain list: a module loaded from torch.export cannot be switched to eval mode by a parent module
        self.inner = [extractor_module]
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.unsqueeze(0))  # 1 x C x h x w, or 1 x C x 1 x 1

    def forward(self, images):
        return self.inner[0](images) * self.scale - self.shift


def save_adjusted_copy(extractor, out, scale, shift, variant_suffix):
    """Export `extractor` (from data.load_extractor) * scale - shift to `out`, with its meta and a new variant."""
    meta = {key: extractor.meta[key] for key in ("input_size", "kind", "method", "channel_groups")}
    meta["variant"] = extractor.meta["variant"] + variant_suffix
    # the loaded module already normalises its input: the copy's own normalisation is the identity
    data.save_extractor(Adjusted(extractor.module, scale, shift), out, meta, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def group_statistics(features, groups):
    """features (N, C, h, w) -> {group: (mean norm per location, mean spatial std per channel)}."""
    return {name: (features[:, a:b].norm(dim=1).mean().item(), features[:, a:b].std(dim=(2, 3)).mean().item())
            for name, a, b in groups}


def first_images(dataset_name, size, n):
    """The first n training images of a dataset at size x size, RGB in [0, 1]: (n, 3, size, size)."""
    dataset = data.make_dataset(dataset_name, "train", size=size, normalize=False)
    return torch.stack([dataset[i]["image"] for i in range(n)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", required=True, help="extractor to inspect (and rescale with --out)")
    parser.add_argument("--reference", default=None, help="extractor whose per-group norms are the target")
    parser.add_argument("--equal-norm", type=float, default=None, help="instead of --reference: rescale every "
                        "group to this / sqrt(groups), so that a location's whole vector has about this norm")
    parser.add_argument("--out", default=None, help="write the rescaled copy of --features here (.pt2)")
    parser.add_argument("--dataset", default="synth-faces", choices=list(data.DATASETS))
    parser.add_argument("--images", type=int, default=64, help="training images the statistics are taken on")
    args = parser.parse_args(argv)
    if (args.reference is None) == (args.equal_norm is None):
        parser.error("give one of --reference and --equal-norm")
    torch.set_num_threads(1)
    features = data.load_extractor(args.features)
    # the extractor was exported for square images of side input_size[0]
    images = first_images(args.dataset, features.meta["input_size"][0], args.images)
    groups = features.meta["channel_groups"]
    with torch.no_grad():
        stats = group_statistics(features(images).float(), groups)
        if args.reference:
            reference = data.load_extractor(args.reference)
            if [g[1:] for g in groups] != [g[1:] for g in reference.meta["channel_groups"]]:
                sys.exit("--features and --reference must have the same channel groups (e.g. two hypercolumns)")
            target = group_statistics(reference(images).float(), groups)
        else:  # the same target norm for every group; there is no reference std to show
            target = {name: (args.equal_norm / len(groups) ** 0.5, None) for name, _, _ in groups}
    scale = torch.ones(features.meta["channels"])
    print(f"{'group':8s} {'norm ref':>9s} {'norm feat':>9s} {'std ref':>8s} {'std feat':>8s} {'scale':>6s}")
    for name, a, b in groups:
        (norm_ref, std_ref), (norm, std) = target[name], stats[name]
        scale[a:b] = norm_ref / norm
        shown_ref = "-" if std_ref is None else f"{std_ref:.3f}"
        print(f"{name:8s} {norm_ref:9.2f} {norm:9.2f} {shown_ref:>8s} {std:8.3f} {norm_ref / norm:6.3f}")
    if args.out:
        save_adjusted_copy(features, args.out, scale, torch.zeros(len(scale), 1, 1), "-rescaled")
        target_name = f"{args.reference}'s mean norms" if args.reference else f"norm {args.equal_norm:g} in all"
        print(f"wrote {args.out}: {args.features} with its groups rescaled to {target_name}")


if __name__ == "__main__":
    main()
