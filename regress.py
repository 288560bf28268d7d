"""Linear evaluation of frozen dense features: DVE's landmark regressor, few-shot, ridge and masks.

Any exported feature extractor (``data.save_extractor``: RGB in [0, 1] -> (B, C, h, w)) is evaluated the same
way: a small head is trained on its FROZEN features with ground-truth annotations and the test error is
reported. This is the protocol of DVE (Thewlis, Albanie, Bilen, Vedaldi, "Unsupervised Learning of Landmarks by
Descriptor Vector Exchange", ICCV 2019, arXiv 1908.06427) that ContrastLandmark (Cheng, Su, Maji, ICCV 2021,
arXiv 2006.14787), LEAD (arXiv 2204.02958) and Rahaman et al. (arXiv 2104.02925) follow; the script never
imports a method file, so every method is judged by the same code. Facts: ../shared/PROTOCOL.md sections 1-4.

The protocol
------------
* Head (DVE's "intermediate keypoint predictor", `DVERegressor`): per annotated landmark, 50 intermediate
  points. A 1x1 conv without bias (weights ~ N(0, 1)) maps C -> nA * 50 response maps; each goes through a
  spatial softmax of 100 * response, whose expectation over the linspace(-1, 1) grid of the feature map is a
  point (x, y); a grouped 1x1 conv without bias (groups = nA) maps each landmark's 100 numbers, ordered
  (x1, y1, x2, y2, ...), to its (x, y) in [-1, 1] (the grid_sample(align_corners=True) convention).
* Loss: smooth L1 between 10 * prediction and 10 * target, targets kp_n = 2 kp / (W - 1) - 1 (`regression_loss`).
* `--optim dve`: Adam lr 1e-3, weight decay 5e-4, amsgrad, batch 32, lr x0.1 at epochs 100 and 250 of 300.
  `--optim contrastlandmark`: Adam lr 1e-3, wd 5e-4, betas (0.5, 0.999), cosine schedule.
* Few-shot (`--annotations N ...`): lr 1e-2, weight decay 5e-2, the TPS "single warp" augmentation of PROTOCOL.md
  section 4 on images, keypoints and masks alike, mean +- std over `--seeds` random subsets (DVE used 3).
* Metrics (`landmark_metrics`): IOD % = 100 * mean ||pred - gt|| / ||gt[e0] - gt[e1]|| with the dataset's eye
  indices; PCK % = share of visible landmarks within 5% of the longer image side; mean pixel error; each also per
  landmark. The primary metric is the dataset's (IOD for faces, PCK for birds).
* `--head ridge` (Rahaman et al. 2021, for DISCOVERED landmarks): the extractor outputs K heatmaps (kind
  "heatmaps"); their soft-argmax gives K points, and closed-form ridge regression (alpha 0.1, no bias) maps those
  2K numbers to the 2 nA annotated coordinates (`ridge_fit`).
* `--task mask` (ContrastLandmark supplement Sec. 5, Tab. 6): a 1x1 conv (with bias) on the frozen features
  predicts the foreground, upsampled bilinearly to the image, BCE loss; reported as the mean over test images of
  the foreground IoU at probability 0.5. The supplement does not say more; these choices are ours.

Reference numbers and how to compare with them
-----------------------------------------------
The published tables (DVE arXiv 1908.06427, ContrastLandmark arXiv 2006.14787) were made with the FAITHFUL
settings: DVE read the test error at the last of 300 epochs (`--epochs 300 --select-on last`); ContrastLandmark
read it at a fixed epoch chosen on the test set (`--optim contrastlandmark --select-on test`, MAFL 120 epochs,
AFLW 45, 300W 80) and truncated PCK distances to integers (`--pck-int-truncation`). Our numbers with the sound
defaults are not directly comparable with theirs, and the results file says which settings made them.

Deviations from DVE / ContrastLandmark, and the sound defaults
--------------------------------------------------------------
* Epochs are selected on a validation split (`--select-on val`), never on the test split; datasets without a
  validation split get one that data.py holds out of their training list with a fixed seed (e.g. 1,000 of
  MAFL's 19,000 training images, which DVE trained on in full). `--epochs` defaults to a short run; the lr
  milestones 100 and 250 of 300 are scaled to the same fractions of `--epochs`.
* PCK is computed in floating point; invisible landmarks are ignored by PCK, IOD, pixel error AND the training
  loss (DVE's face datasets have none; on CUB an invisible part has no meaningful coordinate).
* Frozen features are computed once and cached in float16 when they fit in `--cache-budget-gb` (DVE re-runs the
  network every epoch); float16 keeps ~3 significant digits, far below the regressor's noise. Augmentation
  (few-shot) changes the images every step, so the training features are then streamed: the extractor runs on
  every batch and only validation and test are cached. `--no-augment` makes few-shot runs cacheable (faster,
  but not the protocol). A split whose features overflow float16 is streamed in float32.
* Few-shot: a subset smaller than a batch is repeated within an epoch so that every step sees a full batch of
  (differently augmented) copies. Epoch selection uses the full validation split for every N; `--select-on last`
  avoids those extra labels.
* Scale ablation (LEAD Sec. 4.4, `--zoom-train LO HI`, `--zoom-test LO HI`): each training (resp. validation
  and test) image, with its keypoints and mask, is zoomed out about its centre by a factor drawn uniformly in
  [LO, HI] from (seed, split, index) (`Zoomed`); the features are computed and cached from the zoomed images
  and the default run name ends in -zoomtrainLO-HI / -zoomtestLO-HI. LEAD does not say how it zoomed.
* Keypoints are moved by the warps exactly (data.warp_points), not by DVE's nearest-pixel lookup, and a
  landmark warped out of the frame becomes invisible.

Cost: DVE's head computes nA x 50 softmax maps per image (250 maps of 48x48 for MAFL), about 0.5 s per batch
of 32 on one CPU core, so a faithful run (300 epochs of MAFL) wants a GPU. The defaults are a quick look.

Smallest run: ``python regress.py --features runs/<method>/<name>/<variant>.pt2`` trains for 5 epochs on 500
built-in synthetic faces (validated on 500, tested on 500), prints one line per epoch and a summary line, and
writes runs/regress/<name>/ (args.json, log.jsonl, results.json, predictions.png): about a minute on a shared
2-core CPU with --threads 1 for a 64-channel extractor at 48x48 (a random 3-layer conv net: test IOD ~57%, far
from converged; Gaussian bumps at the true landmarks, tests/bench_oracle.py: 2.7%, the floor of 2 px cells).
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--features", required=True, help="exported extractor (.pt2) written by a method script "
                        "with data.save_extractor; it is evaluated frozen, in eval mode")
    parser.add_argument("--dataset", default="synth-faces", choices=list(data.DATASETS),
                        help="labelled dataset; the built-in synthetic faces need no files")
    parser.add_argument("--data-root", default=None, help="dataset folder on disk (real datasets only)")
    parser.add_argument("--image-size", type=int, default=96, help="side of the square input images in pixels; "
                        "must equal the extractor's input size (96 in every paper)")
    parser.add_argument("--task", default="landmarks", choices=["landmarks", "mask"],
                        help="landmarks: regress the annotated landmarks; mask: figure-ground segmentation "
                        "(ContrastLandmark supplement Tab. 6), needs a dataset with masks (the synthetic ones)")
    parser.add_argument("--head", default="dve", choices=["dve", "ridge"],
                        help="dve: DVE's regressor trained by SGD on dense features; ridge: closed-form ridge "
                        "from the soft-argmax of an extractor of kind 'heatmaps' (Rahaman et al.)")
    parser.add_argument("--optim", default="dve", choices=["dve", "contrastlandmark"],
                        help="dve: Adam amsgrad, lr x0.1 at 1/3 and 5/6 of --epochs (100 and 250 of 300); "
                        "contrastlandmark: Adam betas (0.5, 0.999), cosine schedule")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs; the papers use 300 (DVE) and "
                        "120/45/80 (ContrastLandmark on MAFL/AFLW/300W); the default is a quick look: raise it "
                        "while the validation error still falls")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (32 in both papers)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate on the full training set")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay on the full training set")
    parser.add_argument("--few-shot-lr", type=float, default=1e-2, help="learning rate with --annotations (DVE)")
    parser.add_argument("--few-shot-weight-decay", type=float, default=5e-2,
                        help="weight decay with --annotations (DVE); strong, because a few images overfit fast")
    parser.add_argument("--intermediate-points", type=int, default=50, help="intermediate points per landmark")
    parser.add_argument("--softargmax-mul", type=float, default=100.0,
                        help="multiplier of the responses inside the spatial softmax (DVE's configs: 100)")
    parser.add_argument("--select-on", default="val", choices=["val", "last", "test"],
                        help="epoch whose test number is reported: val = best on the validation split (sound); "
                        "last = DVE's practice; test = best on the TEST split, ContrastLandmark's practice, "
                        "optimistic: only to reproduce their tables")
    parser.add_argument("--annotations", type=int, nargs="+", default=None,
                        help="few-shot: train on N annotated images (several N allowed, e.g. 1 5 10 20 50 100); "
                        "default: the whole training split")
    parser.add_argument("--seeds", type=int, default=1, help="random subsets (and head inits) per setting, "
                        "reported as mean +- std; DVE used 3 for few-shot")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="few-shot TPS 'single warp' augmentation of the training images; default: on with "
                        "--annotations (the protocol), off otherwise (DVE); on means no cached training features")
    parser.add_argument("--pck-int-truncation", action="store_true",
                        help="truncate PCK distances to whole pixels before the threshold, as ContrastLandmark did "
                        "(int32); it loosens the test (2.4 px acts as 3 px at 48 px, 4.8 as 5 at 96 px): only to "
                        "reproduce their numbers")
    parser.add_argument("--ridge-alpha", type=float, default=0.1, help="ridge penalty of --head ridge")
    parser.add_argument("--cache-budget-gb", type=float, default=2.0,
                        help="memory for float16 features cached once (train, then val, then test); a split that "
                        "does not fit is streamed through the extractor every epoch (slow); 0 = never cache")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use at most this many images of each split (0 = all); default: all images of a real "
                        "dataset, the first 500 of each split of the built-in synthetic data (a quick look: "
                        "DVE's head costs ~0.5 s per batch of 32 on a CPU core)")
    parser.add_argument("--zoom-train", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="scale ablation (LEAD Sec. 4.4): zoom every training image out about its centre by a "
                        "factor drawn uniformly in [LO, HI] per image (seeded by split and index, so reproducible; "
                        "1 = unchanged, 2 = half the size, black border); default: off")
    parser.add_argument("--zoom-test", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="the same for the validation and test images, e.g. --zoom-train 1 1.5 --zoom-test 1.5 2 "
                        "tests at scales never seen in training")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0 = main process; "
                        "raise it for real datasets whose JPEG decoding is the bottleneck)")
    parser.add_argument("--plot-images", type=int, default=8, help="test images drawn in predictions.png")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto = cuda if available, else mps, else cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of PyTorch (0 = its default, one per "
                        "core); 1 is often faster on a machine shared with other jobs")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, head init, order and warps")
    parser.add_argument("--name", default=None, help="run name; default: <features file>-<dataset>, plus -mask, "
                        "-ridge or -fewshot when those are used")
    parser.add_argument("--runs-dir", default="runs", help="results go to <runs-dir>/regress/<name>/")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Boilerplate of the evaluation scripts (match.py imports it from here): device, seeding, run directory, log.
# ---------------------------------------------------------------------------------------------------------
def pick_device(name):
    """--device: auto = cuda if available, else mps, else cpu; a requested device that is absent is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        sys.exit(f"error: --device {name} was requested but is not available on this machine; use --device cpu")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(script, args):
    """runs/<script>/<name>/ with args.json and an empty log.jsonl; returns its path."""
    run_dir = os.path.join(args.runs_dir, script, args.name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    open(os.path.join(run_dir, "log.jsonl"), "w").close()
    return run_dir


def log_json(run_dir, record):
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def default_name(features, dataset):
    return f"{os.path.splitext(os.path.basename(features))[0]}-{dataset}"


def assert_frozen(before, after):
    """Raise if the extractor's state (data.Extractor.state_fingerprint) changed during the evaluation."""
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        raise RuntimeError(f"the frozen extractor changed during evaluation: {', '.join(changed)}")


# ---------------------------------------------------------------------------------------------------------
# Metrics: pure functions of predictions and ground truth in pixels (PROTOCOL.md section 2).
# ---------------------------------------------------------------------------------------------------------
LOWER_IS_BETTER = {"iod": True, "error_px": True, "pck": False, "iou": False}


def _masked_mean(values, mask, dim=None):
    """Mean of values where mask is True (over all, or over dim); NaN where nothing is visible."""
    mask = mask.to(values.dtype)
    if dim is None:
        return ((values * mask).sum() / mask.sum()).item()
    return (values * mask).sum(dim) / mask.sum(dim)


def landmark_metrics(pred, gt, visible, size, eye_indices=None, pck_int_truncation=False):
    """pred, gt: (N, K, 2) pixels; visible: (N, K) bool; size: (H, W). Returns floats and per-landmark lists:
    error_px (mean distance), pck (% within 5% of max(H, W)), iod (% of the inter-ocular distance, only with
    eye_indices). Invisible landmarks are ignored everywhere."""
    dist = (pred - gt).norm(dim=-1)  # (N, K) pixels
    within = dist.int() if pck_int_truncation else dist  # ContrastLandmark stored distances as int32
    correct = (within <= 0.05 * max(size)).float() * 100.0  # (N, K) 0 or 100
    out = {"error_px": _masked_mean(dist, visible), "pck": _masked_mean(correct, visible),
           "error_px_per_landmark": _masked_mean(dist, visible, 0).tolist(),
           "pck_per_landmark": _masked_mean(correct, visible, 0).tolist()}
    if eye_indices is not None:
        e0, e1 = eye_indices
        iod = (gt[:, e0] - gt[:, e1]).norm(dim=-1, keepdim=True)  # (N, 1) inter-ocular distance per image
        normalised = 100.0 * dist / iod  # (N, K) in % of the inter-ocular distance
        out["iod"] = _masked_mean(normalised, visible)
        out["iod_per_landmark"] = _masked_mean(normalised, visible, 0).tolist()
    return out


def mask_iou(logits, masks):
    """logits (N, 1, H, W), masks (N, 1, H, W) in {0, 1} -> (N,) foreground IoU at probability 0.5 (logit 0);
    an image where both prediction and truth are empty counts as 1."""
    pred, truth = logits > 0, masks > 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---------------------------------------------------------------------------------------------------------
# Heads: DVE's regressor, the mask head and ridge regression (pure modules and functions).
# ---------------------------------------------------------------------------------------------------------
def expected_location(probs):
    """(B, K, h, w) maps that sum to 1 -> (B, K, 2): expected (x, y) over linspace(-1, 1) grids of the map."""
    coords = data.identity_grid(*probs.shape[-2:], probs.device, probs.dtype).reshape(-1, 2)  # (h*w, 2), x fastest
    return probs.flatten(2) @ coords  # (B, K, h*w) @ (h*w, 2): one pass over the maps


def soft_argmax(logits):
    """(B, K, h, w) logits -> (B, K, 2): the expectation of the spatial softmax (normalised over h * w)."""
    return expected_location(logits.flatten(2).softmax(-1).view_as(logits))


class DVERegressor(nn.Module):
    """DVE's linear landmark regressor (PROTOCOL.md section 1): features (B, C, h, w) -> (B, nA, 2) in [-1, 1]."""

    def __init__(self, channels, n_landmarks, n_points=50, softargmax_mul=100.0):
        super().__init__()
        self.n_landmarks, self.n_points, self.softargmax_mul = n_landmarks, n_points, softargmax_mul
        # Maps n_points * a .. n_points * (a + 1) - 1 belong to landmark a (landmark-major order).
        self.points = nn.Conv2d(channels, n_landmarks * n_points, 1, bias=False)
        nn.init.normal_(self.points.weight)  # standard normal, as DVE's torch.randn descriptors
        # groups = nA: landmark a only sees its own 100 numbers (x1, y1, ..., x50, y50).
        self.combine = nn.Conv2d(n_landmarks * n_points * 2, n_landmarks * 2, 1, groups=n_landmarks, bias=False)

    def forward(self, features):
        # In place: the conv's backward needs its input and weight, not its output (saves a 250-map copy).
        logits = self.points(features).mul_(self.softargmax_mul)  # (B, nA * nI, h, w)
        xy = soft_argmax(logits)  # (B, nA * nI, 2)
        out = self.combine(xy.reshape(len(features), -1, 1, 1))  # (B, nA * 2, 1, 1)
        return out.view(len(features), self.n_landmarks, 2)


class MaskHead(nn.Module):
    """1x1 conv on the features -> foreground logit map, upsampled bilinearly to the image: (B, 1, H, W)."""

    def __init__(self, channels, size):
        super().__init__()
        self.conv, self.size = nn.Conv2d(channels, 1, 1), tuple(size)

    def forward(self, features):
        return F.interpolate(self.conv(features), size=self.size, mode="bilinear", align_corners=True)


def regression_loss(pred, target, visible):
    """Smooth L1 between 10 * pred and 10 * target ((B, nA, 2), normalised), averaged over visible coordinates
    (equal to DVE's F.smooth_l1_loss(10 * pred, 10 * target) when every landmark is visible)."""
    loss = F.smooth_l1_loss(10.0 * pred, 10.0 * target, reduction="none")  # (B, nA, 2)
    weight = visible.unsqueeze(-1).expand_as(loss).to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp(min=1.0)


def ridge_fit(X, Y, alpha):
    """Closed-form ridge without bias: argmin_W ||X W - Y||^2 + alpha ||W||^2 = (X^T X + alpha I)^-1 X^T Y.
    X (N, D), Y (N, T) -> W (D, T), solved in float64 (X^T X of soft-argmax points is ill-conditioned)."""
    X, Y = X.double(), Y.double()
    return torch.linalg.solve(X.T @ X + alpha * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)


def fit_ridge_head(points, targets, visible, alpha):
    """points (N, K, 2) discovered landmarks, targets (N, nA, 2), visible (N, nA), all normalised -> W (2K, 2nA).
    Each annotated landmark is fitted on the images where it is visible."""
    X = points.flatten(1)  # (N, 2K): (x1, y1, x2, y2, ...)
    columns = [ridge_fit(X[visible[:, a]], targets[visible[:, a], a], alpha) for a in range(targets.shape[1])]
    return torch.cat(columns, dim=1)  # (2K, 2 nA)


# ---------------------------------------------------------------------------------------------------------
# Frozen features: cached once in float16 when they fit, otherwise streamed through the extractor.
# A "source" is a dict: dataset, indices (dataset indices), store (cached tensors or None), extractor, workers.
# ---------------------------------------------------------------------------------------------------------
def cache_features(extractor, dataset, indices, batch_size, with_mask, workers=0, desc="cache"):
    """Run the extractor once over dataset[indices] -> dict of CPU tensors: features (N, C, h, w) float16,
    keypoints (N, K, 2) pixels, visible (N, K), and mask (N, 1, H, W) bool. None if float16 overflows."""
    source = dict(dataset=dataset, indices=list(indices), store=None, extractor=extractor, workers=workers)
    parts = {}
    for batch in batches(source, torch.arange(len(indices)), batch_size, "cpu", desc=desc):
        features = batch["features"].half()
        if not torch.isfinite(features).all():
            return None
        batch["features"] = features
        if with_mask:
            batch["mask"] = batch["mask"] > 0.5
        for key in ("features", "keypoints", "visible") + (("mask",) if with_mask else ()):
            parts.setdefault(key, []).append(batch[key].cpu())
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


def batches(source, positions, batch_size, device, augment=False, generator=None, desc=None):
    """Yield dicts of tensors on `device` for source positions (indices into source["indices"]), batch_size at a
    time: features float32 (B, C, h, w), keypoints (B, K, 2) pixels, visible (B, K) bool, mask (B, 1, H, W).
    augment: one random TPS "single warp" per image (PROTOCOL.md section 4), only for streamed sources."""
    chunks = positions.split(batch_size)
    if source["store"] is not None:
        for chunk in tqdm(chunks, desc=desc, leave=False, disable=desc is None):
            yield {k: (v[chunk].float() if k in ("features", "mask") else v[chunk]).to(device)
                   for k, v in source["store"].items()}
        return
    subset = Subset(source["dataset"], [source["indices"][p] for p in positions.tolist()])
    loader = DataLoader(subset, batch_size=batch_size, num_workers=source["workers"])
    for batch in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        images, keypoints, visible = (batch[k].to(device) for k in ("image", "keypoints", "visible"))
        mask = batch["mask"].to(device) if "mask" in batch else None
        if augment:
            size = images.shape[-2:]
            warp = data.random_tps(len(images), "single", generator=generator, device=device)
            images = data.warp_images(images, warp)
            keypoints = data.warp_points(keypoints, warp, size)
            visible = visible & data.in_frame(keypoints, size)  # a landmark warped off the image is unseen
            mask = None if mask is None else (data.warp_images(mask, warp) > 0.5).float()
        with torch.no_grad():
            features = source["extractor"](images).float()
        out = dict(features=features, keypoints=keypoints, visible=visible)
        if mask is not None:
            out["mask"] = mask
        yield out


def epoch_order(n, batch_size, generator):
    """A shuffled pass over n positions, repeated (reshuffled) until it fills at least one batch (few-shot)."""
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(max(1, math.ceil(batch_size / n)))])


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation: a plain loop. `spec` holds what the task needs: task, size (H, W), metric,
# eye_indices, pck_int_truncation.
# ---------------------------------------------------------------------------------------------------------
def make_optimizer(params, recipe, lr, weight_decay, epochs):
    """Adam + per-epoch schedule. dve: amsgrad, x0.1 at epochs 100 and 250 of 300, scaled to `epochs`;
    contrastlandmark: betas (0.5, 0.999), cosine over `epochs`."""
    if recipe == "dve":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True)
        milestones = sorted({max(1, round(epochs * 100 / 300)), max(1, round(epochs * 250 / 300))})
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=(0.5, 0.999))
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))


def head_loss(head, batch, spec):
    if spec["task"] == "mask":
        return F.binary_cross_entropy_with_logits(head(batch["features"]), batch["mask"])
    target = data.to_normalised(batch["keypoints"], spec["size"])  # (B, nA, 2) in [-1, 1]
    return regression_loss(head(batch["features"]), target, batch["visible"])


@torch.no_grad()
def evaluate(head, source, spec, batch_size, device):
    """Metrics of `head` on every image of `source` (dict of floats and per-landmark lists)."""
    head.eval()
    outputs = {"pred": [], "gt": [], "visible": [], "iou": []}
    for batch in batches(source, torch.arange(len(source["indices"])), batch_size, device):
        if spec["task"] == "mask":
            outputs["iou"].append(mask_iou(head(batch["features"]), batch["mask"]).cpu())
            continue
        outputs["pred"].append(data.to_pixels(head(batch["features"]), spec["size"]).cpu())
        outputs["gt"].append(batch["keypoints"].cpu())
        outputs["visible"].append(batch["visible"].cpu())
    if spec["task"] == "mask":
        return {"iou": 100.0 * torch.cat(outputs["iou"]).mean().item()}
    return landmark_metrics(torch.cat(outputs["pred"]), torch.cat(outputs["gt"]), torch.cat(outputs["visible"]),
                            spec["size"], spec["eye_indices"], spec["pck_int_truncation"])


def scalars(metrics):
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def fit(head, spec, train, val, test, recipe, lr, weight_decay, epochs, batch_size, select_on, augment, device,
        seed, log=None):
    """Train `head` on frozen features, evaluate val every epoch (and test when selecting on it), restore the
    selected epoch and return {selected_epoch, val, test}. log(record) receives one dict per epoch."""
    generator = torch.Generator().manual_seed(seed)  # order and warps: CPU draws, identical on every device
    optimizer, scheduler = make_optimizer(head.parameters(), recipe, lr, weight_decay, epochs)
    metric, best = spec["metric"], None
    for epoch in range(1, epochs + 1):
        head.train()
        positions = epoch_order(len(train["indices"]), batch_size, generator)
        bar = tqdm(batches(train, positions, batch_size, device, augment, generator), leave=False,
                   total=math.ceil(len(positions) / batch_size), desc=f"epoch {epoch}/{epochs}")
        losses = []
        for batch in bar:
            loss = head_loss(head, batch, spec)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        record["val"] = evaluate(head, val, spec, batch_size, device)
        if select_on == "test":  # ContrastLandmark's practice: looks at the test split every epoch
            record["test"] = evaluate(head, test, spec, batch_size, device)
        value = None if select_on == "last" else record[select_on][metric]
        if select_on == "last" or best is None or (value < best["value"] if LOWER_IS_BETTER[metric] else
                                                   value > best["value"]):
            best = dict(value=value, epoch=epoch, state=copy.deepcopy(head.state_dict()), val=record["val"],
                        test=record.get("test"))
        if log is not None:
            log({k: scalars(v) if isinstance(v, dict) else v for k, v in record.items()})
    head.load_state_dict(best["state"])
    return {"selected_epoch": best["epoch"], "val": best["val"],
            "test": best["test"] or evaluate(head, test, spec, batch_size, device)}


def collect_points(source, batch_size, device):
    """Soft-argmax of every image's heatmaps -> points (N, K, 2) normalised, keypoints (N, nA, 2) px, visible."""
    parts = {"points": [], "keypoints": [], "visible": []}
    for batch in batches(source, torch.arange(len(source["indices"])), batch_size, device, desc="heatmaps"):
        maps = batch["features"].clamp(min=0)  # (B, K, h, w) probability maps
        parts["points"].append(expected_location(maps / maps.sum((2, 3), keepdim=True).clamp(min=1e-12)).cpu())
        parts["keypoints"].append(batch["keypoints"].cpu())
        parts["visible"].append(batch["visible"].cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def plot_predictions(images, pred, gt, visible, masks, path):
    """Test images with true (green circles) and predicted (red crosses) landmarks, or predicted mask contours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
        if masks is not None:  # predicted foreground probability as a red overlay
            ax.imshow(masks[i][0].numpy(), cmap="Reds", alpha=0.45, vmin=0, vmax=1)
            continue
        v = visible[i]
        ax.scatter(gt[i, v, 0], gt[i, v, 1], s=30, facecolors="none", edgecolors="lime", label="true")
        ax.scatter(pred[i, v, 0], pred[i, v, 1], s=30, c="red", marker="x", label="predicted")
    fig.suptitle("red: predicted foreground probability" if masks is not None else "green o: true, red x: predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_few_shot(table, metric, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([r["annotations"] for r in table], [r["mean"] for r in table], yerr=[r["std"] for r in table],
                marker="o", capsize=3)
    ax.set(xscale="log", xlabel="annotated training images", ylabel=f"test {metric}", title="few-shot regression")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# main: checks, data, caching, one run per (annotations, seed), the frozen check, results.
# ---------------------------------------------------------------------------------------------------------
def check_flags(args, meta, dataset):
    """Flag combinations that cannot work stop with one sentence."""
    problems = []
    if list(meta["input_size"]) != [args.image_size, args.image_size]:
        problems.append(f"the extractor takes {meta['input_size'][0]}x{meta['input_size'][1]} images but "
                        f"--image-size is {args.image_size}")
    if args.head == "ridge" and meta["kind"] != "heatmaps":
        problems.append(f"--head ridge needs an extractor of kind 'heatmaps' (K landmark maps); {args.features} "
                        f"is of kind {meta['kind']!r}: use --head dve")
    if args.head == "ridge" and args.task == "mask":
        problems.append("--head ridge regresses landmarks; use --head dve with --task mask")
    if args.head == "ridge" and args.augment:
        problems.append("--augment needs a trained head; --head ridge is fitted once, in closed form")
    if args.task == "mask" and not dataset.has_mask:
        problems.append(f"--task mask needs foreground masks and dataset {args.dataset!r} has none; "
                        "use a synthetic dataset")
    if args.task == "landmarks" and dataset.num_landmarks == 0:
        problems.append(f"dataset {args.dataset!r} has no landmark annotations")
    if any(zoom is not None and not 0 < zoom[0] <= zoom[1] for zoom in (args.zoom_train, args.zoom_test)):
        problems.append("--zoom-train and --zoom-test take two factors 0 < LO <= HI (1 = no zoom, 2 = half size)")
    if args.epochs < 1 or args.seeds < 1 or (args.annotations and min(args.annotations) < 1):
        problems.append("--epochs, --seeds and --annotations must be positive")
    if problems:
        sys.exit(f"error: {problems[0]}")


class Zoomed(torch.utils.data.Dataset):
    """A labelled dataset whose every image (keypoints, visibility and mask alike) is zoomed out about its centre
    by a factor drawn uniformly in [lo, hi] from (seed, split, index) alone (data.zoom_out): the scale ablation
    of LEAD Sec. 4.4. Every other attribute is the wrapped dataset's."""

    def __init__(self, dataset, lo, hi, split, seed=0):
        self.dataset, self.lo, self.hi, self.code = dataset, lo, hi, (seed * 3 + data.SPLIT_CODES[split]) * 10 ** 7

    def __getattr__(self, name):  # name, mean, std, num_landmarks, eye_indices, metric, has_mask, ...
        return getattr(self.__dict__["dataset"], name)

    def __len__(self):
        return len(self.dataset)

    def factor(self, i):
        u = torch.rand((), generator=torch.Generator().manual_seed(self.code + i)).item()
        return self.lo + (self.hi - self.lo) * u

    def __getitem__(self, i):
        sample = dict(self.dataset[i])
        size = tuple(sample["image"].shape[-2:])
        warp = data.zoom_out(1, self.factor(i))
        sample["image"] = data.warp_images(sample["image"][None], warp)[0]
        if "mask" in sample:
            sample["mask"] = (data.warp_images(sample["mask"][None], warp)[0] > 0.5).float()
        if sample["keypoints"].numel():
            sample["keypoints"] = data.warp_points(sample["keypoints"][None], warp, size)[0]
            sample["visible"] = sample["visible"] & data.in_frame(sample["keypoints"], size)
        return sample


def make_sources(args, extractor):
    """Build train/val/test sources (images in [0, 1], capped by --max-images, zoomed out with --zoom-*)."""
    sources, cap = {}, args.max_images
    if cap is None and args.dataset.startswith("synth-"):
        cap = 500
    for split in ("train", "val", "test"):
        dataset = data.make_dataset(args.dataset, split, root=args.data_root, size=args.image_size, normalize=False)
        zoom = args.zoom_train if split == "train" else args.zoom_test
        if zoom is not None:  # the features are then computed (and cached) from the zoomed images
            dataset = Zoomed(dataset, *zoom, split, args.seed)
        sources[split] = dict(dataset=dataset, indices=list(range(len(dataset)))[:cap or None], store=None,
                              extractor=extractor, workers=args.workers)
    return sources


def cache_what_fits(sources, per_image, budget_gb, skip, batch_size, with_mask):
    """Cache splits in order of use (train and val every epoch, test once) while they fit the budget."""
    budget, cached = budget_gb * 1e9, {}
    for split in ("train", "val", "test"):
        need = per_image * len(sources[split]["indices"])
        if split not in skip and need <= budget:
            src = sources[split]
            src["store"] = cache_features(src["extractor"], src["dataset"], src["indices"], batch_size, with_mask,
                                          src["workers"], f"cache {split}")
            budget -= need * (src["store"] is not None)
        cached[split] = sources[split]["store"] is not None
    return cached


def split_keypoints(source, held=None):
    """Keypoints (N, nA, 2) px and visibility (N, nA) of every image of a source, from what already holds them
    (`held`: collect_points' output, or the feature cache); only otherwise are the images read again."""
    held = held or source["store"]
    if held is not None:
        return held["keypoints"], held["visible"]
    samples = [source["dataset"][i] for i in source["indices"]]
    return torch.stack([x["keypoints"] for x in samples]), torch.stack([x["visible"] for x in samples])


def mean_shape_reference(train, test, spec):
    """What a head that ignores the image scores: every test image is given the mean training shape (each
    landmark's mean over its visible training instances). A regressor that does not beat it has learnt nothing
    from the features; on aligned faces it is a strong baseline. train, test: (keypoints, visible) pairs."""
    (train_kp, train_vis), (test_kp, test_vis) = train, test
    weights = train_vis.float().unsqueeze(-1)  # (N, nA, 1)
    mean = (train_kp * weights).sum(0) / weights.sum(0).clamp(min=1)  # (nA, 2)
    return landmark_metrics(mean.expand_as(test_kp), test_kp, test_vis, spec["size"], spec["eye_indices"],
                            spec["pck_int_truncation"])


def ridge_predict(points, W, size):
    """points (N, K, 2) normalised, W (2K, 2nA) -> predicted landmarks (N, nA, 2) in pixels."""
    return data.to_pixels((points.flatten(1).double() @ W).float().view(len(points), -1, 2), size)


def run(args):
    """The whole evaluation for parsed arguments; returns the results dict (also written to results.json)."""
    zooms = "".join(f"-zoom{split}{zoom[0]:g}-{zoom[1]:g}" for split, zoom in (("train", args.zoom_train),
                                                                             ("test", args.zoom_test)) if zoom)
    args.name = args.name or (default_name(args.features, args.dataset) + "-mask" * (args.task == "mask")
                              + "-ridge" * (args.head == "ridge") + "-fewshot" * bool(args.annotations) + zooms)
    start = time.time()
    device = pick_device(args.device)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The softmax of 100 x response underflows to denormal floats, on which CPUs are ~100x slower: flushing them to
    # zero made DVE's head 6x faster per step on CPU (measured), and changes nothing above 1e-38.
    torch.set_flush_denormal(True)
    extractor = data.load_extractor(args.features, device)
    sources = make_sources(args, extractor)
    meta, train_ds, test_src = extractor.meta, sources["train"]["dataset"], sources["test"]
    check_flags(args, meta, train_ds)
    run_dir = make_run_dir("regress", args)
    fingerprint = extractor.state_fingerprint()
    few_shot = args.annotations is not None
    augment = (few_shot and args.head == "dve") if args.augment is None else args.augment
    metric = "iou" if args.task == "mask" else {"iod": "iod", "pck": "pck"}.get(train_ds.metric, "error_px")
    metric = "error_px" if metric == "iod" and train_ds.eye_indices is None else metric
    size = (args.image_size, args.image_size)
    spec = dict(task=args.task, size=size, metric=metric, eye_indices=train_ds.eye_indices,
                pck_int_truncation=args.pck_int_truncation)

    # One random training subset per (N, seed), drawn from the seed alone (subsets of different N are not nested).
    n_train = len(sources["train"]["indices"])
    if few_shot and max(args.annotations) > n_train:
        sys.exit(f"error: --annotations {max(args.annotations)} exceeds the {n_train} training images in use")
    sizes = args.annotations or [n_train]
    subsets = {(n, s): (sorted(torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed + s))[:n]
                               .tolist()) if few_shot else list(range(n_train)))
               for n in sizes for s in range(args.seeds)}
    with torch.no_grad():
        probe = extractor(test_src["dataset"][test_src["indices"][0]]["image"][None])  # (1, C, h, w)
    per_image = probe[0].numel() * 2 + (size[0] * size[1] if args.task == "mask" else 0)  # float16 + bool mask
    skip = ("train", "val", "test") if args.head == "ridge" else ("train",) if augment else ()
    cached = cache_what_fits(sources, per_image, args.cache_budget_gb, skip, args.batch_size, args.task == "mask")
    print(f"features {tuple(probe.shape[1:])} of kind {meta['kind']} ({meta['method']}/{meta['variant']}); "
          f"float16 cache: {', '.join(s for s in cached if cached[s]) or 'none'}; streamed: "
          f"{', '.join(s for s in cached if not cached[s]) or 'none'}")
    if args.head == "ridge":  # the K discovered points of every image, computed once
        points = {split: collect_points(sources[split], args.batch_size, device) for split in ("train", "test")}

    runs = []
    for (n, s), subset in subsets.items():
        seed_everything(args.seed + s)
        rows = torch.tensor(subset)
        if args.head == "ridge":
            tr, te = points["train"], points["test"]
            W = fit_ridge_head(tr["points"][rows], data.to_normalised(tr["keypoints"][rows], size),
                               tr["visible"][rows], args.ridge_alpha)
            test_pred = ridge_predict(te["points"], W, size)
            result = {"selected_epoch": None, "val": None, "test": landmark_metrics(
                test_pred, te["keypoints"], te["visible"], size, spec["eye_indices"], args.pck_int_truncation)}
        else:
            full = sources["train"]
            train = dict(full, indices=[full["indices"][r] for r in subset],
                         store=None if full["store"] is None else {k: v[rows] for k, v in full["store"].items()})
            head = (MaskHead(probe.shape[1], size) if args.task == "mask" else
                    DVERegressor(probe.shape[1], train_ds.num_landmarks, args.intermediate_points,
                                 args.softargmax_mul)).to(device)
            lr, wd = (args.few_shot_lr, args.few_shot_weight_decay) if few_shot else (args.lr, args.weight_decay)

            def log(record):  # one JSON line and one printed line per epoch
                log_json(run_dir, {"annotations": n, "seed": args.seed + s, **record})
                tqdm.write(f"N={n} seed={args.seed + s} epoch {record['epoch']}/{args.epochs}: loss "
                           f"{record['loss']:.4f}, val {metric} {record['val'][metric]:.3f}")
            result = fit(head, spec, train, sources["val"], test_src, args.optim, lr, wd, args.epochs, args.batch_size,
                         args.select_on, augment, device, args.seed + s, log)
        runs.append({"annotations": n, "seed": args.seed + s, **result})
        selected = f" (epoch {result['selected_epoch']}, selected on {args.select_on})" if result["val"] else ""
        print(f"N={n} seed={args.seed + s}: test {metric} {result['test'][metric]:.3f}{selected}")

    # The extractor only ever ran under no_grad and was never given to an optimiser: prove it did not change.
    assert_frozen(fingerprint, extractor.state_fingerprint())

    table = [{"annotations": n, "mean": float(np.mean(v)), "std": float(np.std(v)), "runs": len(v)}
             for n in sizes for v in [[r["test"][metric] for r in runs if r["annotations"] == n]]]
    if len(sizes) > 1:
        plot_few_shot(table, metric, os.path.join(run_dir, "few_shot.png"))
    if args.plot_images > 0:  # the last run's head on the first test images
        samples = [test_src["dataset"][i] for i in test_src["indices"][:args.plot_images]]
        images = torch.stack([x["image"] for x in samples])
        gt, visible = torch.stack([x["keypoints"] for x in samples]), torch.stack([x["visible"] for x in samples])
        pred = masks = None
        with torch.no_grad():
            if args.head == "ridge":
                pred = test_pred[:len(samples)]
            elif args.task == "landmarks":
                pred = data.to_pixels(head.eval()(extractor(images).float()), size).cpu()
            else:
                masks = torch.sigmoid(head.eval()(extractor(images).float())).cpu()
        plot_predictions(images, pred, gt, visible, masks, os.path.join(run_dir, "predictions.png"))

    reference = None
    if args.task == "landmarks":
        held = points if args.head == "ridge" else {}
        reference = mean_shape_reference(*[split_keypoints(sources[s], held.get(s)) for s in ("train", "test")], spec)
    results = {"settings": vars(args), "extractor": meta,
               "dataset": {"name": args.dataset, **{s: len(sources[s]["indices"]) for s in sources},
                           "landmark_names": list(train_ds.landmark_names), "eye_indices": train_ds.eye_indices},
               "metric": metric, "lower_is_better": LOWER_IS_BETTER[metric], "augment": augment, "cached": cached,
               "selection": ("closed form, no epochs" if args.head == "ridge" else
                             f"epoch with the best validation {metric}" if args.select_on == "val" else
                             "last epoch (DVE's practice)" if args.select_on == "last" else
                             f"epoch with the best TEST {metric} (ContrastLandmark's practice, optimistic)"),
               "runs": runs, "table": table, "mean_shape": reference, "frozen_extractor_unchanged": True,
               "seconds": time.time() - start}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    shown = "; ".join(f"N={r['annotations']}: {r['mean']:.2f} +- {r['std']:.2f}" if few_shot or args.seeds > 1
                      else f"{r['mean']:.2f}" for r in table)
    baseline = f"; the mean training shape scores {reference[metric]:.2f}" if reference else ""
    print(f"regress {args.name}: test {metric} {shown} ({args.task}, head {args.head}, "
          f"{results['selection']}{baseline}) in {time.time() - start:.0f} s -> {run_dir}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except data.DatasetError as error:  # a user's mistake (missing or malformed files): one sentence, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
