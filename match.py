"""Matching and equivariance benchmarks of frozen dense features, for any exported extractor.

Two ways to ask "do these features put the same object point at the same descriptor?" without training
anything on top of them:

1. Landmark matching (DVE, Thewlis et al., ICCV 2019, arXiv 1908.06427, Sec. 4; ContrastLandmark, Cheng et
   al., ICCV 2021, arXiv 2006.14787). Test images in order, two at a time (A, B), warp seed 0. Source = A
   warped twice, same-identity target = A warped once, different-identity target = B warped once (thin-plate
   splines on a 10x10 control grid, preset "match" of data.random_tps: every parameter of the training pairs of
   data.tps_training_pair halved). For each ground-truth landmark of the
   source, its descriptor is compared with every target descriptor and the arg-max is the prediction; the
   error is the distance to the true target location in a 70x70 frame (x 70 / 96), averaged over all landmark
   instances (500 sources x 5 landmarks on MAFL), separately for same and different identity.
   `--variant dve`: raw dot product on the extractor's own grid, the prediction is the arg-max cell's centre in
   input pixels (quantised to the stride, as DVE). `--variant contrastlandmark`: features upsampled bilinearly
   to the input, L2-normalised per channel group (meta["channel_groups"], e.g. hypercolumn layers) and
   concatenated before the dot product, so the prediction is a pixel.
2. Equivariance accuracy Acc(d) (Rahaman, Ghosh, Thiery 2021, arXiv 2104.02925, Eq. 4-6): x' = g x with g a
   random rotation (uniform within +-30 degrees) followed by an elastic warp; for each annotated landmark y_j
   of x, the location of x' whose (upsampled) feature is most cosine-similar to f(y_j); Acc(d) = share within
   d pixels of g(y_j), for d = 0..20, one curve per extractor (or per channel group with `--groups`).

Choices and deviations (same convention everywhere: a (h, w) map spans the image with align_corners=True, i.e.
cell (0, 0) sits on pixel (0, 0) and cell (h-1, w-1) on pixel (H-1, W-1), as the regressor's linspace(-1, 1)
grid assumes)
* Source descriptors are sampled at the exact (sub-pixel) landmark by bilinear interpolation of the map that
  is compared (the protocol only says "at that location"; sampling avoids rounding the landmark to a cell).
* Ground truth in the target is the exact forward warp of the source landmark (data.warp_points), not DVE's
  nearest-pixel lookup; landmarks that leave the frame or are not visible are skipped and counted.
* Built-in synthetic faces: B is the next image of ANOTHER identity (indices P*j..P*j+P-1 share one), and a
  third line, "same identity by construction", uses another pose of A's identity warped once (ground truth:
  that image's own landmarks, warped): it asks for invariance to pose and expression, not only to a warp.
  On MAFL identities are unknown and consecutive images are taken as different, as DVE did.

Smallest run: ``python match.py --features runs/<method>/<name>/<variant>.pt2 --equivariance`` prints one line
with the same / different / same-by-construction errors and Acc(5 px), and writes runs/match/<name>/
(args_match.json, log_match.jsonl, results.json, matches.png, equivariance.png): about 30 s on a 2-core CPU for a 64-channel extractor
at 48x48 (a random 3-layer conv net: ~27 same, ~28 different, Acc(5 px) ~0.7; Gaussian bumps at the true
landmarks, tests/bench_oracle.py: ~0.57, the floor set by the 2 px cells).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from regress import assert_frozen, default_name  # the two evaluation scripts name and check runs alike


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--features", required=True, nargs="+", help="one or several exported extractors (.pt2) "
                        "written with data.save_extractor; each is benchmarked, and all share the Acc(d) plot")
    parser.add_argument("--dataset", default="synth-faces", choices=list(data.DATASETS),
                        help="test images with landmarks: mafl (the protocol) or the built-in synthetic faces")
    parser.add_argument("--data-root", default=None, help="dataset folder on disk (real datasets only)")
    parser.add_argument("--image-size", type=int, default=96, help="side of the square input images in pixels; "
                        "must equal the extractors' input size")
    parser.add_argument("--variant", default="dve", choices=["dve", "contrastlandmark"],
                        help="dve: raw dot product on the extractor's grid; contrastlandmark: upsampled to the "
                        "input and L2-normalised per channel group")
    parser.add_argument("--pairs", type=int, default=500, help="number of sources (pairs A, B of consecutive "
                        "test images); the protocol uses 500 on MAFL's 1,000 test images")
    parser.add_argument("--equivariance", action=argparse.BooleanOptionalAction, default=False,
                        help="also measure Rahaman et al.'s Acc(d) under rotation + elastic warps")
    parser.add_argument("--groups", action=argparse.BooleanOptionalAction, default=False,
                        help="Acc(d) per channel group of each extractor too (e.g. the hypercolumn's layers)")
    parser.add_argument("--equivariance-images", type=int, default=200, help="test images used for Acc(d)")
    parser.add_argument("--rotation", type=float, default=30.0, help="Acc(d): rotation uniform within +- degrees")
    parser.add_argument("--elastic-alpha", type=float, default=0.05,
                        help="Acc(d): rms elastic displacement in normalised units (0.05 ~ 2.4 px at 96 px)")
    parser.add_argument("--elastic-sigma", type=float, default=0.2,
                        help="Acc(d): smoothness of the elastic field in normalised units (0.2 ~ 10 px at 96 px)")
    parser.add_argument("--acc-at", type=float, default=5.0, help="d (input pixels) of the Acc(d) in the summary; "
                        "also the radius that makes a drawn match green")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per extractor call; lower it if memory "
                        "runs out (the contrastlandmark variant holds full-resolution maps)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto = cuda if available, else mps, else cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of PyTorch (0 = its default, one per "
                        "core); 1 is often faster on a machine shared with other jobs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the warps (0 in the protocol)")
    parser.add_argument("--name", default=None, help="run name; default: <first features file>-<dataset>")
    parser.add_argument("--runs-dir", default="runs", help="results go to <runs-dir>/match/<name>/")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Matching: pure functions of feature maps and points.
# ---------------------------------------------------------------------------------------------------------
def descriptor_maps(features, size, upsample, groups=None):
    """The map that is compared. features (B, C, h, w) -> (B, C, h, w), or (B, C, H, W) with upsample (bilinear,
    align_corners=True); groups [[name, start, stop], ...]: L2-normalise each group per location, then concatenate."""
    if upsample:
        features = F.interpolate(features, size=size, mode="bilinear", align_corners=True)
    if groups:
        features = torch.cat([F.normalize(features[:, a:b], dim=1) for _, a, b in groups], dim=1)
    return features


def sample_descriptors(maps, points, size):
    """maps (B, C, h, w) spanning the image, points (B, K, 2) in pixels -> (B, K, C), bilinear at the points."""
    grid = data.to_normalised(points, size).unsqueeze(2).to(maps.dtype)  # (B, K, 1, 2)
    return F.grid_sample(maps, grid, mode="bilinear", align_corners=True)[..., 0].transpose(1, 2)


def best_matches(descriptors, maps, size, cosine=False):
    """descriptors (B, K, C), maps (B, C, h, w) -> (B, K, 2): pixel centre of the cell with the largest dot
    product (cosine similarity with cosine=True) with each descriptor."""
    targets = maps.flatten(2)  # (B, C, h*w)
    if cosine:
        descriptors, targets = F.normalize(descriptors, dim=-1), F.normalize(targets, dim=1)
    best = (descriptors @ targets).argmax(-1)  # (B, K, h*w) scores -> (B, K) cell index
    cells = data.to_pixels(data.identity_grid(*maps.shape[-2:], maps.device, maps.dtype).reshape(-1, 2), size)
    return cells[best]  # (B, K, 2)


def predict_matches(source_features, source_points, target_features, size, upsample, groups=None, cosine=False):
    """Source landmarks (B, K, 2) px -> predicted target locations (B, K, 2) px, one image at a time (an upsampled
    hypercolumn of 3,840 channels at 96x96 takes 140 MB per image)."""
    out = []
    for i in range(len(source_features)):
        src = descriptor_maps(source_features[i:i + 1], size, upsample, groups)
        tgt = descriptor_maps(target_features[i:i + 1], size, upsample, groups)
        out.append(best_matches(sample_descriptors(src, source_points[i:i + 1], size), tgt, size, cosine))
    return torch.cat(out)


def matching_errors(pred, truth, valid, size, frame=70.0):
    """Distances (B, K) between predictions and truth (pixels) rescaled to a frame x frame image (70 / 96 for 96 px
    images, DVE's convention), flattened to the valid landmark instances only."""
    scale = pred.new_tensor([frame / size[1], frame / size[0]])
    return ((pred - truth) * scale).norm(dim=-1)[valid]


def accuracy_curve(errors, max_distance=20):
    """Acc(d) for d = 0..max_distance: share of errors (pixels) <= d (Rahaman et al., Eq. 6)."""
    return [(errors <= d).float().mean().item() for d in range(max_distance + 1)]


# ---------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------
def make_triples(dataset, n_pairs):
    """(A, B, A2) per source: A = 2i; B = 2i + 1, or when that image shows A's identity (built-in data) the
    first image of the next identity; A2 = another pose of A's identity, or None when poses are unknown."""
    P, n = dataset.poses_per_identity, len(dataset)
    if 2 * n_pairs > n:
        raise data.DatasetError(f"--pairs {n_pairs} needs {2 * n_pairs} test images; {dataset.name} has {n}")
    triples = []
    for i in range(n_pairs):
        a = 2 * i
        b = a + 1 if P == 1 else (P * (a // P + 1)) % n  # P > 1: a + 1 may be the same identity
        a2 = None if P == 1 else P * (a // P) + (a % P + 1) % P
        triples.append((a, b, a2))
    return triples


def stack(samples):
    return (torch.stack([s["image"] for s in samples]), torch.stack([s["keypoints"] for s in samples]),
            torch.stack([s["visible"] for s in samples]))


def warped_pairs(dataset, triples, generator):
    """Images and true landmarks of one batch of triples: source = A warped twice; targets "same" (A warped
    once), "different" (B warped once) and, when A2 exists, "same_by_construction" (A2 warped once)."""
    size = dataset.size
    (a_img, a_kp, a_vis) = stack([dataset[a] for a, _, _ in triples])
    pair = data.tps_training_pair(a_img, a_kp, generator=generator, preset="match")
    source = dict(image=pair.image2, points=pair.points2, valid=a_vis & data.in_frame(pair.points2, size))
    targets = {"same": dict(image=pair.image1, points=pair.points1, valid=data.in_frame(pair.points1, size))}
    others = {"different": [b for _, b, _ in triples]}
    if triples[0][2] is not None:
        others["same_by_construction"] = [a2 for _, _, a2 in triples]
    for line, indices in others.items():
        img, kp, vis = stack([dataset[i] for i in indices])
        warp = data.random_tps(len(indices), "match", generator=generator)
        points = data.warp_points(kp, warp, size)
        targets[line] = dict(image=data.warp_images(img, warp), points=points, valid=vis & data.in_frame(points, size))
    return source, targets


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def plot_matches(source, targets, predictions, correct_px, path):
    """One row per target line: source | target, lines from each source landmark to its predicted match,
    green when within correct_px of the truth, red otherwise; true target locations as white circles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(targets), 1, figsize=(6, 3 * len(targets)), squeeze=False)
    for ax, (line, target) in zip(axes[:, 0], targets.items()):
        width = source["image"].shape[-1]
        ax.imshow(torch.cat([source["image"][0], target["image"][0]], dim=2).permute(1, 2, 0).clamp(0, 1).numpy())
        pred, truth, valid = predictions[line][0], target["points"][0], source["valid"][0] & target["valid"][0]
        for k in torch.nonzero(valid).flatten().tolist():
            ok = (pred[k] - truth[k]).norm() <= correct_px
            ax.plot([source["points"][0, k, 0], pred[k, 0] + width], [source["points"][0, k, 1], pred[k, 1]],
                    color="lime" if ok else "red", linewidth=1.2)
            ax.scatter([truth[k, 0] + width], [truth[k, 1]], s=25, facecolors="none", edgecolors="white")
        ax.set_title(f"source (A warped twice) -> {line}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(curves, acc_at, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker=".", label=label)
    ax.axvline(acc_at, color="grey", linestyle=":")
    ax.set(xlabel="d (pixels)", ylabel="Acc(d)", ylim=(0, 1), title="equivariance accuracy (Rahaman et al.)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# The two benchmarks and main
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def matching_benchmark(extractors, dataset, triples, args, device):
    """Errors in the 70x70 frame per extractor and line, on the same warped images (seed --seed) for all of them.
    Returns ({name: {line: stats}}, what plot_matches needs for the first batch of the first extractor)."""
    size, upsample = dataset.size, args.variant == "contrastlandmark"
    generator = torch.Generator().manual_seed(args.seed)
    errors, first = {name: {} for name in extractors}, None
    for i in tqdm(range(0, len(triples), args.batch_size), desc="matching", leave=False):
        source, targets = warped_pairs(dataset, triples[i:i + args.batch_size], generator)
        for name, ex in extractors.items():
            groups = ex.meta["channel_groups"] if upsample else None
            src_features = ex(source["image"].to(device)).float()  # (B, C, h, w)
            predictions = {}
            for line, target in targets.items():
                predictions[line] = predict_matches(src_features, source["points"].to(device),
                                                    ex(target["image"].to(device)).float(), size, upsample,
                                                    groups).cpu()  # (B, K, 2) pixels
                valid = source["valid"] & target["valid"]  # (B, K): in both frames and visible
                errors[name].setdefault(line, []).append(
                    (matching_errors(predictions[line], target["points"], valid, size), (~valid).sum().item()))
            first = first or (source, targets, predictions)
    stats = {name: {line: {"mean_error": torch.cat([c[0] for c in chunks]).mean().item(),
                           "median_error": torch.cat([c[0] for c in chunks]).median().item(),
                           "landmarks": sum(len(c[0]) for c in chunks), "skipped": sum(c[1] for c in chunks)}
                    for line, chunks in lines.items()} for name, lines in errors.items()}
    return stats, first


@torch.no_grad()
def equivariance_benchmark(extractors, dataset, args, device):
    """Acc(d) curves: x' = elastic(rotation(x)) with the same warps for every extractor; one curve per extractor
    and, with --groups, per channel group. Returns {label: {acc, d, acc_at_d, landmarks}}."""
    size, generator = dataset.size, torch.Generator().manual_seed(args.seed)
    indices, distances = list(range(min(args.equivariance_images, len(dataset)))), {}
    for i in tqdm(range(0, len(indices), args.batch_size), desc="equivariance", leave=False):
        image, kp, vis = stack([dataset[j] for j in indices[i:i + args.batch_size]])
        n = len(image)
        warp = data.random_affine(n, rotation_deg=args.rotation, scale=(1.0, 1.0), translation=0.0,
                                  generator=generator).then(
            data.random_elastic(n, alpha=args.elastic_alpha, sigma=args.elastic_sigma, generator=generator))
        warped, moved = data.warp_images(image, warp), data.warp_points(kp, warp, size)  # x' and g(y_j)
        valid = vis & data.in_frame(kp, size) & data.in_frame(moved, size)  # (B, K)
        for name, ex in extractors.items():
            f, f_warped = ex(image.to(device)).float(), ex(warped.to(device)).float()
            parts = [(name, 0, f.shape[1])]
            if args.groups:
                parts += [(f"{name}:{g}", a, b) for g, a, b in ex.meta["channel_groups"]]
            for label, a, b in parts:
                pred = predict_matches(f[:, a:b], kp.to(device), f_warped[:, a:b], size, True, cosine=True).cpu()
                distances.setdefault(label, []).append((pred - moved).norm(dim=-1)[valid])
    out = {}
    for label, chunks in distances.items():
        d = torch.cat(chunks)  # (M,) pixel distances of all valid landmark instances
        out[label] = {"acc": accuracy_curve(d), "d": args.acc_at, "acc_at_d": (d <= args.acc_at).float().mean().item(),
                      "landmarks": len(d)}
    return out


def run(args):
    """The whole evaluation for parsed arguments; returns the results dict (also written to results.json)."""
    args.name = args.name or default_name(args.features[0], args.dataset)
    start = time.time()
    device = data.choose_device(args.device)
    data.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    extractors = {os.path.splitext(os.path.basename(p))[0]: data.load_extractor(p, device) for p in args.features}
    dataset = data.make_dataset(args.dataset, "test", root=args.data_root, size=args.image_size, normalize=False)
    triples = make_triples(dataset, args.pairs)
    if len(extractors) != len(args.features):
        sys.exit("error: two --features files share a file name; rename one so the results can tell them apart")
    for path, ex in zip(args.features, extractors.values()):
        if list(ex.meta["input_size"]) != [args.image_size, args.image_size]:
            sys.exit(f"error: {path} takes {ex.meta['input_size'][0]}x{ex.meta['input_size'][1]} images but "
                     f"--image-size is {args.image_size}")
    if dataset.num_landmarks == 0:
        sys.exit(f"error: dataset {args.dataset!r} has no landmarks to match")
    run_dir = data.start_run(args.runs_dir, "match", args.name, "match", args, resume=True)
    fingerprints = {name: ex.state_fingerprint() for name, ex in extractors.items()}

    results = {"settings": vars(args), "dataset": args.dataset, "variant": args.variant, "frame": 70,
               "extractors": {name: ex.meta for name, ex in extractors.items()}}
    results["matching"], first = matching_benchmark(extractors, dataset, triples, args, device)
    for name, lines in results["matching"].items():
        data.log(run_dir, "match", {"benchmark": "matching", "features": name,
                                    **{line: round(v["mean_error"], 3) for line, v in lines.items()}})
    plot_matches(*first, args.acc_at, os.path.join(run_dir, "matches.png"))
    if args.equivariance:
        results["equivariance"] = equivariance_benchmark(extractors, dataset, args, device)
        data.log(run_dir, "match", {"benchmark": "equivariance", "d": args.acc_at,
                                    **{k: v["acc_at_d"] for k, v in results["equivariance"].items()}})
        plot_accuracy({k: v["acc"] for k, v in results["equivariance"].items()}, args.acc_at,
                      os.path.join(run_dir, "equivariance.png"))

    for name, ex in extractors.items():  # the extractors only ran under no_grad: prove their weights are intact
        assert_frozen(fingerprints[name], ex.state_fingerprint())
    results.update(frozen_extractors_unchanged=True, seconds=time.time() - start)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    parts = []
    for name, lines in results["matching"].items():
        text = f"{name}: same {lines['same']['mean_error']:.2f}, different {lines['different']['mean_error']:.2f}"
        if "same_by_construction" in lines:
            text += f", same identity by construction {lines['same_by_construction']['mean_error']:.2f}"
        if args.equivariance:
            text += f", Acc({args.acc_at:g} px) {results['equivariance'][name]['acc_at_d']:.2f}"
        parts.append(text)
    count = results["matching"][next(iter(extractors))]["same"]["landmarks"]
    print(f"match {args.name} ({args.variant} variant, mean error in the 70x70 frame over {count} landmarks): "
          f"{'; '.join(parts)} in {time.time() - start:.0f} s -> {run_dir}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except data.DatasetError as error:  # a user's mistake (missing or malformed files): one sentence, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
