"""Linear evaluation of frozen dense features: DVE's landmark regressor, few-shot, ridge and masks.

Any exported feature extractor (``data.save_extractor``: RGB in [0, 1] -> (B, C, h, w)) is evaluated the same
way: a small head is trained on its FROZEN features with ground-truth annotations and the test error is
reported. This is the protocol of DVE (Thewlis, Albanie, Bilen, Vedaldi, "Unsupervised Learning of Landmarks by
Descriptor Vector Exchange", ICCV 2019, arXiv 1908.06427) that ContrastLandmark (Cheng, Su, Maji, ICCV 2021,
arXiv 2006.14787), LEAD (arXiv 2204.02958) and Rahaman et al. (arXiv 2104.02925) follow; the script never
imports a method file, so every method is judged by the same code. docs/protocol.md states the protocol's facts,
docs/evaluation.md every choice below with its measurement and command.

* Head (`DVERegressor`, every protocol): per annotated landmark 50 intermediate points, each the soft-argmax of
  100 x a 1x1-conv response map over the linspace(-1, 1) grid of the feature map; a per-landmark linear map of its
  50 points gives the landmark. Loss: smooth L1 of 10 x the normalised coordinates (`regression_loss`).
* Metrics (`landmark_metrics`): IOD % (error / inter-ocular distance; `--eyes` names them for a CSV), PCK % within
  5% of the longer image side (CUB; a CSV without eyes), mean pixel error; also per landmark.
* Few-shot (`--annotations 1 5 10 ...`): lr 1e-2, weight decay 5e-2, a small random thin-plate-spline warp of each
  training image, mean +- std over `--seeds` subsets. `--head ridge` (Rahaman et al.): ridge from the soft-argmax
  of K discovered heatmaps. `--task mask` (ContrastLandmark supplement Tab. 6): a 1x1 conv, BCE, foreground IoU.

Protocols (`--protocol`). `dve` is DVE's recipe: N(0, 1) weights on the raw features, Adam lr 1e-3, weight
decay 5e-4, amsgrad, batch 32, 300 epochs, lr x0.1 at epochs 100 and 250, float32, the last epoch (for a GPU).
`contrastlandmark`: betas (0.5, 0.999) and a cosine schedule. `default` is ours, with these deviations:
* Each channel is standardised by its mean and std measured on the training features, times sqrt(C) (a location's
  descriptor then has unit mean squared norm); `--no-standardize` turns it off. The mean adds a constant to each
  response map, which the softmax ignores, and the std is a change of the 1x1 conv's weights: the head represents
  the same functions, but Adam, whose steps are the same size for every weight, no longer moves a channel 10x
  larger 10x faster, so that the result does not depend on how the extractor scales its channels.
* Weights ~ N(0, 1 / 100^2): the responses enter the softmax at unit scale, so its gradient reaches every cell.
* Adam lr 1e-2 (DVE's few-shot rate), a linear warm-up over the first epoch and a cosine decay to zero per step,
  10 epochs (doubling them changed the test error by 1 %), bfloat16 autocast where the device has it.
Every protocol: epochs are selected on a validation split held out of the training list when the dataset has
none (not for dve); PCK in floating point (`--pck-int-truncation`: ContrastLandmark's whole pixels); invisible
landmarks ignored by loss and metrics; keypoints moved by warps exactly. Frozen features are computed once and
cached in float16 on the device while they fit `--cache-budget-gb`, otherwise streamed through the extractor by
`--workers` loader processes (and so are the warped few-shot training images). `--zoom-train/--zoom-test`: LEAD's
scale ablation (Sec. 4.4), each image zoomed out about its centre by a factor drawn from (seed, split, index).

Smallest run: ``python regress.py --features runs/<method>/<name>/<variant>.pt2``: 500 built-in synthetic faces per
split, one line per epoch, then the test error beside the mean training shape's (a head that ignores the image);
writes runs/regress/<name>/ (args_regress.json, log_regress.jsonl, results.json, predictions.png).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data

# What each protocol sets when its flag is not given (see the docstring).
PROTOCOLS = {
    "default": dict(epochs=10, lr=1e-2, weight_decay=5e-4, standardize=True, amp="auto", select_on="val"),
    "dve": dict(epochs=300, lr=1e-3, weight_decay=5e-4, standardize=False, amp="none", select_on="last"),
    "contrastlandmark": dict(epochs=120, lr=1e-3, weight_decay=5e-4, standardize=False, amp="none", select_on="val"),
}
VAL_SIZE_DATASETS = ("mafl", "aflw-m", "aflw-r", "300w", "cub", "cats")  # those that hold out their own val split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--features", required=True, help="exported extractor (.pt2, data.save_extractor), evaluated frozen")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="labelled dataset (synth-*: built in)")
    add("--data-root", default=None, help="dataset folder on disk (real datasets only)")
    add("--val-size", type=int, default=None, help="validation images held out of the training list of mafl, aflw-m, "
        "aflw-r, 300w, cub and cats (default: data.py's, 1,000 for MAFL); lower it for a small folder of your own")
    add("--eyes", nargs=2, default=None, metavar=("E0", "E1"), help="the two landmarks (CSV header names or 0-based "
        "indices) whose distance normalises the error (IOD); default: the dataset's eyes, for a CSV the two header "
        "names that contain 'eye'; a CSV without them is scored by PCK")
    add("--image-size", type=int, default=96, help="input side in pixels; the extractor's (96 in every paper)")
    add("--task", default="landmarks", choices=["landmarks", "mask"],
        help="mask: figure-ground segmentation (ContrastLandmark supplement Tab. 6), synthetic datasets only")
    add("--head", default="dve", choices=["dve", "ridge"], help="dve: DVE's regressor on dense features; ridge: "
        "closed-form ridge from the soft-argmax of an extractor of kind 'heatmaps' (Rahaman et al.)")
    add("--protocol", "--optim", default="default", choices=list(PROTOCOLS), help="how the head is trained (--optim: "
        "its former name). default: ours, "
        "converges in minutes on a CPU whatever the channels' scale (standardised features, small init, Adam 1e-2 "
        "with warm-up and cosine, bf16, 10 epochs); dve: DVE's exact recipe (N(0, 1) init, Adam amsgrad 1e-3, lr "
        "x0.1 at 1/3 and 5/6 of 300 epochs, fp32, last epoch), for a GPU; contrastlandmark: Adam betas (0.5, "
        "0.999), cosine, 120 epochs. Flags marked 'protocol' override its choice")
    add("--epochs", type=int, default=None, help="protocol: 10, dve 300, contrastlandmark 120; if the validation "
        "error still falls at the end, double it")
    add("--lr", type=float, default=None, help="protocol: 1e-2, dve and contrastlandmark 1e-3")
    add("--weight-decay", type=float, default=None, help="protocol: 5e-4")
    add("--standardize", action=argparse.BooleanOptionalAction, default=None, help="protocol (on, off for dve and "
        "contrastlandmark): standardise each channel with statistics of the training features")
    add("--amp", default=None, choices=["auto", "bf16", "fp16", "none"], help=f"protocol (auto, none for dve and "
        f"contrastlandmark): {data.AMP_HELP}")
    add("--select-on", default=None, choices=["val", "last", "test"], help="protocol: the epoch reported. val: best "
        "on the validation split (sound); last: DVE's practice (dve); test: best on the TEST split, ContrastLandmark's "
        "practice, optimistic: only to reproduce their tables")
    add("--batch-size", type=int, default=32, help="images per step (32 in both papers)")
    add("--few-shot-lr", type=float, default=1e-2, help="learning rate with --annotations (DVE)")
    add("--few-shot-weight-decay", type=float, default=5e-2, help="weight decay with --annotations (DVE)")
    add("--intermediate-points", type=int, default=50, help="intermediate points per landmark (DVE)")
    add("--softargmax-mul", type=float, default=100.0, help="multiplier of the responses in the softmax (DVE: 100)")
    add("--annotations", type=int, nargs="+", default=None, help="few-shot: train on N annotated images (several "
        "allowed, e.g. 1 5 10 20 50 100); default: the whole training split")
    add("--seeds", type=int, default=1, help="random subsets per setting, reported as mean +- std (DVE: 3)")
    add("--augment", action=argparse.BooleanOptionalAction, default=None, help="warp the training images (TPS "
        "'single'); default: on with --annotations (DVE's few-shot protocol); on means streamed training features")
    add("--pck-int-truncation", action="store_true", help="truncate PCK distances to whole pixels as ContrastLandmark "
        "did (2.4 px acts as 3 px): only to reproduce their numbers")
    add("--ridge-alpha", type=float, default=0.1, help="ridge penalty of --head ridge")
    add("--cache-budget-gb", type=float, default=None, help="memory on the device for the float16 features cached "
        "once (train, then val); what does not fit is streamed through the extractor every epoch (slow); 0 = never; "
        "default: half of the device's free memory (the host's on a CPU)")
    add("--max-images", type=int, default=None, help="at most this many images per split (0 = all); default: all of a "
        "real dataset, 500 of the synthetic data")
    add("--zoom-train", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="scale ablation (LEAD Sec. "
        "4.4): zoom each training image out about its centre by a factor drawn in [LO, HI] (2 = half the size)")
    add("--zoom-test", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="the same for validation and test")
    add("--workers", type=int, default=None, help="loader processes that read and decode the images the extractor "
        "streams; default: data.default_workers (the cores on a GPU, 1 on a CPU); 0 = the main process")
    add("--plot-images", type=int, default=8, help="test images drawn in predictions.png")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--threads", type=int, default=0, help="CPU threads (0 = PyTorch's default); 1 helps on a shared machine")
    add("--seed", type=int, default=0, help="seed of subsets, head init, order and warps")
    add("--name", default=None, help="run name; default: <features file>-<dataset>[-mask|-ridge|-fewshot|-protocol]")
    add("--runs-dir", default="runs", help="results go to <runs-dir>/regress/<name>/")
    args = parser.parse_args(argv)
    for key, value in PROTOCOLS[args.protocol].items():  # the protocol fills in what was not given
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    return args


def default_name(features, dataset):
    return f"{os.path.splitext(os.path.basename(features))[0]}-{dataset}"


def assert_frozen(before, after):
    """Raise if the extractor's state (data.Extractor.state_fingerprint) changed during the evaluation."""
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        raise RuntimeError(f"the frozen extractor changed during evaluation: {', '.join(changed)}")


# ---------------------------------------------------------------------------------------------------------
# Metrics: pure functions of predictions and ground truth in pixels.
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


def mean_shape_reference(train, test, spec):
    """What a head that ignores the image scores: every test image is given the mean training shape (each
    landmark's mean over its visible training instances). A regressor that does not beat it has learnt nothing
    from the features; on aligned faces it is a strong baseline. train, test: (keypoints, visible) pairs."""
    (train_kp, train_vis), (test_kp, test_vis) = train, test
    weights = train_vis.float().unsqueeze(-1)  # (N, nA, 1)
    mean = (train_kp * weights).sum(0) / weights.sum(0).clamp(min=1)  # (nA, 2)
    return landmark_metrics(mean.expand_as(test_kp), test_kp, test_vis, spec["size"], spec["eye_indices"],
                            spec["pck_int_truncation"])


# ---------------------------------------------------------------------------------------------------------
# Heads: DVE's regressor, the mask head, the fixed standardisation, and ridge regression.
# ---------------------------------------------------------------------------------------------------------
def expected_location(probs):
    """(B, K, h, w) maps that sum to 1 -> (B, K, 2): expected (x, y) over linspace(-1, 1) grids of the map."""
    coords = data.identity_grid(*probs.shape[-2:], probs.device, probs.dtype).reshape(-1, 2)  # (h*w, 2), x fastest
    return probs.flatten(2) @ coords  # (B, K, h*w) @ (h*w, 2): one pass over the maps


def soft_argmax(logits):
    """(B, K, h, w) logits -> (B, K, 2): the expectation of the spatial softmax (normalised over h * w)."""
    return expected_location(logits.flatten(2).softmax(-1).view_as(logits))


class StandardizedConv(nn.Conv2d):
    """A 1x1 conv of (f - mean) / std per channel, computed without that pass over the features: its weight is
    divided by std and the mean moves into the bias (the same output). mean and std are fixed buffers, measured on
    the training features (`channel_stats`); the identity until set. For DVE's head the bias term is a constant
    per map, which the softmax ignores: standardising changes how Adam moves the weights, not what they can do."""

    def __init__(self, channels, out, bias):
        super().__init__(channels, out, 1, bias=bias)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def forward(self, features):
        weight = self.weight / self.std.clamp(min=1e-12).view(1, -1, 1, 1)  # a constant channel gets weight 0
        bias = -(weight.flatten(1) @ self.mean) + (0 if self.bias is None else self.bias)  # (out,)
        return F.conv2d(features, weight, bias)


class DVERegressor(nn.Module):
    """DVE's linear landmark regressor: features (B, C, h, w) -> (B, nA, 2) in [-1, 1]; init_std: of the response
    weights (DVE: 1)."""

    def __init__(self, channels, n_landmarks, n_points=50, softargmax_mul=100.0, init_std=1.0):
        super().__init__()
        self.n_landmarks, self.n_points, self.softargmax_mul = n_landmarks, n_points, softargmax_mul
        # Maps n_points * a .. n_points * (a + 1) - 1 belong to landmark a (landmark-major order).
        self.points = StandardizedConv(channels, n_landmarks * n_points, bias=False)
        nn.init.normal_(self.points.weight, std=init_std)  # DVE: standard normal (torch.randn)
        # groups = nA: landmark a only sees its own 100 numbers (x1, y1, ..., x50, y50).
        self.combine = nn.Conv2d(n_landmarks * n_points * 2, n_landmarks * 2, 1, groups=n_landmarks, bias=False)

    def forward(self, features):
        # The softmax runs in float32 (100 x a bfloat16 response is off by up to ~1 where it is large); in place:
        # the conv's backward needs its input and weight, not its output (saves a 250-map copy).
        logits = self.points(features).float().mul_(self.softargmax_mul)  # (B, nA * nI, h, w)
        xy = soft_argmax(logits)  # (B, nA * nI, 2)
        out = self.combine(xy.reshape(len(features), -1, 1, 1))  # (B, nA * 2, 1, 1)
        return out.view(len(features), self.n_landmarks, 2).float()


class MaskHead(nn.Module):
    """1x1 conv on the features -> foreground logit map, upsampled bilinearly to the image: (B, 1, H, W)."""

    def __init__(self, channels, size):
        super().__init__()
        self.conv, self.size = StandardizedConv(channels, 1, bias=True), tuple(size)

    def forward(self, features):
        return F.interpolate(self.conv(features).float(), size=self.size, mode="bilinear", align_corners=True)


def set_stats(head, mean, std):
    """Give every StandardizedConv of `head` the per-channel mean and std of the training features."""
    for module in head.modules():
        if isinstance(module, StandardizedConv):
            module.mean.copy_(mean), module.std.copy_(std)


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


def ridge_predict(points, W, size):
    """points (N, K, 2) normalised, W (2K, 2nA) -> predicted landmarks (N, nA, 2) in pixels."""
    return data.to_pixels((points.flatten(1).double() @ W).float().view(len(points), -1, 2), size)


# ---------------------------------------------------------------------------------------------------------
# Frozen features: cached once in float16 on the device when they fit, otherwise streamed through the extractor.
# A "source" is a dict: dataset, indices (dataset indices), store (cached tensors or None), extractor, workers.
# ---------------------------------------------------------------------------------------------------------
def cache_features(source, batch_size, with_mask, device, desc="cache"):
    """Run the extractor once over the source -> dict of tensors on `device`: features (N, C, h, w) float16,
    keypoints (N, K, 2) pixels, visible (N, K), and mask (N, 1, H, W) bool. None if float16 overflows."""
    parts = {}
    for batch in batches(dict(source, store=None), torch.arange(len(source["indices"])), batch_size, device, desc=desc):
        batch["features"] = batch["features"].half()
        if not torch.isfinite(batch["features"]).all():
            return None
        if with_mask:
            batch["mask"] = batch["mask"] > 0.5
        for key in ("features", "keypoints", "visible") + (("mask",) if with_mask else ()):
            parts.setdefault(key, []).append(batch[key])
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


def batches(source, positions, batch_size, device, augment=False, generator=None, desc=None, dtype=torch.float32):
    """Yield dicts of tensors on `device` for source positions (indices into source["indices"]), batch_size at a
    time: features (B, C, h, w) in `dtype` (bfloat16 under bf16 autocast: one cast from the float16 cache),
    keypoints (B, K, 2) pixels, visible (B, K) bool, mask (B, 1, H, W) float. augment: one random TPS "single warp"
    per image, only for streamed sources."""
    if source["store"] is not None:
        for chunk in tqdm(positions.split(batch_size), desc=desc, leave=False, disable=desc is None):
            batch = {k: v[chunk.to(v.device)].to(device, non_blocking=True) for k, v in source["store"].items()}
            yield dict(batch, features=batch["features"].to(dtype), **({"mask": batch["mask"].float()}
                                                                        if "mask" in batch else {}))
        return
    subset = Subset(source["dataset"], [source["indices"][p] for p in positions.tolist()])
    loader = DataLoader(subset, batch_size=batch_size, num_workers=source["workers"],
                        pin_memory=torch.device(device).type == "cuda")
    for batch in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        batch = data.to_device({k: batch[k] for k in ("image", "keypoints", "visible", "mask") if k in batch}, device)
        if augment:
            size = batch["image"].shape[-2:]
            warp = data.random_tps(len(batch["image"]), "single", generator=generator, device=device)
            batch["image"] = data.warp_images(batch["image"], warp)
            batch["keypoints"] = data.warp_points(batch["keypoints"], warp, size)
            batch["visible"] = batch["visible"] & data.in_frame(batch["keypoints"], size)  # warped off: unseen
            if "mask" in batch:
                batch["mask"] = (data.warp_images(batch["mask"], warp) > 0.5).float()
        with torch.no_grad():
            batch["features"] = source["extractor"](batch.pop("image")).to(dtype)
        yield batch


@torch.no_grad()
def channel_stats(source, batch_size, device):
    """Per-channel mean and std (C,) of a source's features over images and locations, summed in float64."""
    total, total_sq, count = 0.0, 0.0, 0
    for batch in batches(source, torch.arange(len(source["indices"])), batch_size, device):
        f = batch["features"].double()  # (B, C, h, w)
        total, total_sq, count = total + f.sum((0, 2, 3)), total_sq + f.square().sum((0, 2, 3)), count + f[:, 0].numel()
    mean = total / count
    return mean.float(), (total_sq / count - mean.square()).clamp(min=0).sqrt().float()


def cache_budget(device):
    """Half of the device's free memory in GB (the host's available memory on a CPU or mps)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2e9
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2e9


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation: a plain loop. `spec` holds what the task needs: task, size (H, W), metric,
# eye_indices, pck_int_truncation.
# ---------------------------------------------------------------------------------------------------------
def make_optimizer(params, protocol, lr, weight_decay, epochs, steps_per_epoch):
    """Adam and a schedule stepped once per STEP. dve: amsgrad, x0.1 at epochs 100 and 250 of 300, scaled to
    `epochs`; contrastlandmark: betas (0.5, 0.999), cosine over the epochs; default: linear warm-up over the first
    epoch, then cosine to zero."""
    if protocol == "dve":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True)
        milestones = [max(1, round(epochs * m / 300)) * steps_per_epoch for m in (100, 250)]
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    total = epochs * steps_per_epoch

    def schedule(step):  # a factor of lr at this step
        if protocol == "default":  # warm-up over the first epoch, then cosine to zero over every step
            return min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total))
        return 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / epochs))  # per epoch, as the reference
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay,
                                 betas=(0.9, 0.999) if protocol == "default" else (0.5, 0.999))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def head_loss(head, batch, spec):
    if spec["task"] == "mask":
        return F.binary_cross_entropy_with_logits(head(batch["features"]), batch["mask"])
    target = data.to_normalised(batch["keypoints"], spec["size"])  # (B, nA, 2) in [-1, 1]
    return regression_loss(head(batch["features"]), target, batch["visible"])


@torch.no_grad()
def evaluate(head, source, spec, batch_size, device, amp=None):
    """Metrics of `head` on every image of `source` (dict of floats and per-landmark lists)."""
    head.eval()
    outputs = {"pred": [], "gt": [], "visible": [], "iou": []}
    for batch in batches(source, torch.arange(len(source["indices"])), batch_size, device, dtype=amp or torch.float32):
        with data.autocast(torch.device(device), amp):
            out = head(batch["features"])
        if spec["task"] == "mask":
            outputs["iou"].append(mask_iou(out, batch["mask"]).cpu())
            continue
        outputs["pred"].append(data.to_pixels(out, spec["size"]).cpu())
        outputs["gt"].append(batch["keypoints"].cpu())
        outputs["visible"].append(batch["visible"].cpu())
    if spec["task"] == "mask":
        return {"iou": 100.0 * torch.cat(outputs["iou"]).mean().item()}
    return landmark_metrics(torch.cat(outputs["pred"]), torch.cat(outputs["gt"]), torch.cat(outputs["visible"]),
                            spec["size"], spec["eye_indices"], spec["pck_int_truncation"])


def fit(head, spec, train, val, test, protocol, lr, weight_decay, epochs, batch_size, select_on, augment, device,
        seed, log=None, amp=None):
    """Train `head` on frozen features, evaluate val every epoch (and test when selecting on it), restore the
    selected epoch and return {selected_epoch, val, test}. log(record) receives one dict per epoch."""
    device = torch.device(device)
    steps_per_epoch = math.ceil(max(len(train["indices"]), batch_size) / batch_size)
    optimizer, scheduler = make_optimizer(head.parameters(), protocol, lr, weight_decay, epochs, steps_per_epoch)
    scaler, metric, best = data.grad_scaler(device, amp), spec["metric"], None
    for epoch in range(1, epochs + 1):
        head.train()
        generator = data.generator(seed, epoch)  # order and warps: CPU draws, the same on every device
        positions = epoch_order(len(train["indices"]), batch_size, generator)
        bar = tqdm(batches(train, positions, batch_size, device, augment, generator, dtype=amp or torch.float32),
                   leave=False,
                   total=math.ceil(len(positions) / batch_size), desc=f"epoch {epoch}/{epochs}")
        loss_sum = torch.zeros((), device=device)
        for step, batch in enumerate(bar):
            with data.autocast(device, amp):
                loss = head_loss(head, batch, spec)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach()  # read once per epoch: no host synchronisation per step
        record = {"epoch": epoch, "loss": loss_sum.item() / (step + 1), "lr": optimizer.param_groups[0]["lr"],
                  "val": evaluate(head, val, spec, batch_size, device, amp)}
        if select_on == "test":  # ContrastLandmark's practice: looks at the test split every epoch
            record["test"] = evaluate(head, test, spec, batch_size, device, amp)
        value = None if select_on == "last" else record[select_on][metric]
        if select_on == "last" or best is None or (value < best["value"] if LOWER_IS_BETTER[metric] else
                                                   value > best["value"]):
            best = dict(value=value, epoch=epoch, state=copy.deepcopy(head.state_dict()), val=record["val"],
                        test=record.get("test"))
        if log is not None:
            log(record)
    head.load_state_dict(best["state"])
    return {"selected_epoch": best["epoch"], "val": best["val"],
            "test": best["test"] or evaluate(head, test, spec, batch_size, device, amp)}


def epoch_order(n, batch_size, generator):
    """A shuffled pass over n positions, repeated (reshuffled) until it fills at least one batch (few-shot)."""
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(max(1, math.ceil(batch_size / n)))])


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
def figure(rows, cols, size):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_predictions(images, pred, gt, visible, masks, path):
    """Test images with true (green circles) and predicted (red crosses) landmarks, or the predicted foreground."""
    fig, axes = figure(math.ceil(len(images) / 4), min(len(images), 4), (2.5, 2.5))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            if masks is not None:  # predicted foreground probability as a red overlay
                ax.imshow(masks[i][0].numpy(), cmap="Reds", alpha=0.45, vmin=0, vmax=1)
            else:
                ax.scatter(*gt[i, visible[i]].T, s=30, facecolors="none", edgecolors="lime")
                ax.scatter(*pred[i, visible[i]].T, s=30, c="red", marker="x")
    fig.suptitle("red: predicted foreground probability" if masks is not None else "green o: true, red x: predicted")
    save_figure(fig, path)


def plot_few_shot(table, metric, path):
    fig, axes = figure(1, 1, (5, 3.5))
    axes[0, 0].errorbar([r["annotations"] for r in table], [r["mean"] for r in table],
                        yerr=[r["std"] for r in table], marker="o", capsize=3)
    axes[0, 0].set(xscale="log", xlabel="annotated training images", ylabel=f"test {metric}", title="few-shot")
    save_figure(fig, path)


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
    if args.head == "ridge" and (args.task == "mask" or args.augment):
        problems.append("--head ridge regresses landmarks once, in closed form: no --task mask, no --augment")
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


def eye_pair(args, dataset):
    """(e0, e1) for the IOD: --eyes (names or indices), else the dataset's own, else (a CSV) the two header names
    that contain 'eye'; None means the dataset is scored by PCK."""
    names = [n.lower() for n in dataset.landmark_names]
    if args.eyes:
        pair = tuple(int(e) if e.isdigit() else names.index(e.lower()) if e.lower() in names else -1 for e in args.eyes)
        if not all(0 <= e < len(names) for e in pair):
            raise data.DatasetError(f"--eyes {' '.join(args.eyes)}: expected two of the landmarks "
                                    f"{', '.join(dataset.landmark_names)} (names or 0-based indices)")
        return pair
    if dataset.eye_indices is not None or args.dataset != "csv":
        return dataset.eye_indices
    eyes = [i for i, n in enumerate(names) if "eye" in n]
    return tuple(eyes) if len(eyes) == 2 else None


def make_sources(args, extractor):
    """Build train/val/test sources (images in [0, 1], capped by --max-images, zoomed out with --zoom-*)."""
    sources, cap = {}, args.max_images
    if cap is None and args.dataset.startswith("synth-"):
        cap = 500
    sizes = {"val_size": args.val_size} if args.val_size is not None and args.dataset in VAL_SIZE_DATASETS else {}
    for split in ("train", "val", "test"):
        try:
            dataset = data.make_dataset(args.dataset, split, root=args.data_root, size=args.image_size,
                                        normalize=False, **sizes)
        except data.DatasetError as error:  # too few images for the held-out validation split: say which flag
            raise data.DatasetError(f"{error} with --val-size N" if "hold out" in str(error) else str(error))
        if args.dataset == "csv" or args.eyes:
            dataset.eye_indices = eye_pair(args, dataset)
            dataset.metric = "iod" if dataset.eye_indices is not None else "pck"
        zoom = args.zoom_train if split == "train" else args.zoom_test
        if zoom is not None:  # the features are then computed (and cached) from the zoomed images
            dataset = Zoomed(dataset, *zoom, split, args.seed)
        sources[split] = dict(dataset=dataset, indices=list(range(len(dataset)))[:cap or None], store=None,
                              extractor=extractor, workers=args.workers)
    return sources


def cache_what_fits(sources, per_image, budget_gb, skip, batch_size, with_mask, device):
    """Cache splits in order of use (train and val every epoch, test once) on `device` while they fit the budget."""
    budget = budget_gb * 1e9
    for split in ("train", "val", "test"):
        need = per_image * len(sources[split]["indices"])
        if split not in skip and need <= budget:
            sources[split]["store"] = cache_features(sources[split], batch_size, with_mask, device, f"cache {split}")
            budget -= need * (sources[split]["store"] is not None)
    return {split: sources[split]["store"] is not None for split in sources}


def split_keypoints(source, held=None):
    """Keypoints (N, nA, 2) px and visibility (N, nA) of every image of a source, from what already holds them
    (`held`: collect_points' output, or the feature cache); only otherwise are the images read again."""
    held = held or source["store"]
    if held is not None:
        return held["keypoints"].cpu(), held["visible"].cpu()
    samples = [source["dataset"][i] for i in source["indices"]]
    return torch.stack([x["keypoints"] for x in samples]), torch.stack([x["visible"] for x in samples])


def make_head(args, channels, n_landmarks, size, train, device):
    """DVE's regressor (or the mask head) for the protocol: with --standardize, behind the fixed standardisation of
    the training features `train` (a source), scaled by sqrt(C) so that a location's descriptor has unit mean
    squared norm whatever C is; the default protocol starts the weights at 1 / softargmax-mul, so that the
    responses enter the softmax at unit scale and its gradient reaches every location (N(0, 1) leaves it an
    arg-max at a random cell, whose gradient is ~0 elsewhere: measured slower, docs/evaluation.md)."""
    init_std = 1.0 / args.softargmax_mul if args.protocol == "default" else 1.0
    head = (MaskHead(channels, size) if args.task == "mask" else
            DVERegressor(channels, n_landmarks, args.intermediate_points, args.softargmax_mul, init_std))
    if args.standardize:
        mean, std = channel_stats(train, args.batch_size, device)
        set_stats(head, mean, std * channels ** 0.5)
    return head.to(device)


def setup(args):
    """Name, device, seeds, extractor, sources (with what fits cached), checks, run directory and task spec."""
    zooms = "".join(f"-zoom{split}{zoom[0]:g}-{zoom[1]:g}" for split, zoom in (("train", args.zoom_train),
                                                                             ("test", args.zoom_test)) if zoom)
    args.name = args.name or (default_name(args.features, args.dataset) + "-mask" * (args.task == "mask")
                              + "-ridge" * (args.head == "ridge") + "-fewshot" * bool(args.annotations)
                              + f"-{args.protocol}" * (args.protocol != "default") + zooms)
    device = data.choose_device(args.device)
    data.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The softmax of 100 x response underflows to denormal floats, on which CPUs are ~100x slower: flushing them to
    # zero made DVE's head 6x faster per step on CPU (measured), and changes nothing above 1e-38.
    torch.set_flush_denormal(True)
    args.workers = data.default_workers(device) if args.workers is None else args.workers
    args.augment = (bool(args.annotations) and args.head == "dve") if args.augment is None else args.augment
    extractor = data.load_extractor(args.features, device)
    sources = make_sources(args, extractor)
    train_ds = sources["train"]["dataset"]
    check_flags(args, extractor.meta, train_ds)
    if args.annotations and max(args.annotations) > len(sources["train"]["indices"]):
        sys.exit(f"error: --annotations {max(args.annotations)} exceeds the {len(sources['train']['indices'])} "
                 f"training images in use")
    metric = "iou" if args.task == "mask" else {"iod": "iod", "pck": "pck"}.get(train_ds.metric, "error_px")
    metric = "error_px" if metric == "iod" and train_ds.eye_indices is None else metric
    spec = dict(task=args.task, size=(args.image_size,) * 2, metric=metric, eye_indices=train_ds.eye_indices,
                pck_int_truncation=args.pck_int_truncation)
    run_dir = data.start_run(args.runs_dir, "regress", args.name, "regress", args, resume=True)
    return device, extractor, sources, spec, run_dir


def plot_test_images(args, spec, source, extractor, head, ridge_pred, path):
    """The last run's head (or ridge predictions) on the first --plot-images test images -> predictions.png."""
    samples = [source["dataset"][i] for i in source["indices"][:args.plot_images]]
    images = torch.stack([x["image"] for x in samples])
    gt, visible = torch.stack([x["keypoints"] for x in samples]), torch.stack([x["visible"] for x in samples])
    with torch.no_grad():
        out = None if ridge_pred is not None else head.eval()(extractor(images).float()).cpu()
    pred = ridge_pred[:len(samples)] if ridge_pred is not None else (
        data.to_pixels(out, spec["size"]) if args.task == "landmarks" else None)
    plot_predictions(images, pred, gt, visible, torch.sigmoid(out) if args.task == "mask" else None, path)


def run(args):
    """The whole evaluation for parsed arguments; returns the results dict (also written to results.json)."""
    start = time.time()
    device, extractor, sources, spec, run_dir = setup(args)
    meta, train_ds, test_src, metric = extractor.meta, sources["train"]["dataset"], sources["test"], spec["metric"]
    fingerprint, amp = extractor.state_fingerprint(), data.amp_dtype(device, args.amp)
    channels = meta["channels"]
    per_image = channels * math.prod(meta["output_size"]) * 2 + (
        args.image_size ** 2 if args.task == "mask" else 0)  # bytes: float16 features and a bool mask
    # Cached: what is read every epoch (train unless warped, val); test is read once unless selected on.
    skip = ("train", "val", "test") if args.head == "ridge" else ("train",) * args.augment + ("test",) * (
        args.select_on != "test")
    budget = cache_budget(device) if args.cache_budget_gb is None else args.cache_budget_gb
    cached = cache_what_fits(sources, per_image, budget, skip, args.batch_size, args.task == "mask", device)
    print(f"features {channels} x {meta['output_size']} of kind {meta['kind']} ({meta['method']}/{meta['variant']}); "
          f"float16 cache on {device.type}: {', '.join(s for s in cached if cached[s]) or 'none'}; protocol "
          f"{args.protocol}")
    if args.head == "ridge":  # the K discovered points of every image, computed once
        points = {split: collect_points(sources[split], args.batch_size, device) for split in ("train", "test")}

    # One run per (N, seed); its random training subset is drawn from the seed alone (sizes are not nested).
    n_train, sizes, runs, head, ridge_pred = len(sources["train"]["indices"]), args.annotations, [], None, None
    for n, s in [(n, s) for n in (sizes or [n_train]) for s in range(args.seeds)]:
        data.seed_everything(args.seed + s)
        subset = (sorted(torch.randperm(n_train, generator=data.generator(args.seed + s))[:n].tolist()) if sizes
                  else list(range(n_train)))
        if args.head == "ridge":
            tr, te, rows = points["train"], points["test"], torch.tensor(subset)
            W = fit_ridge_head(tr["points"][rows], data.to_normalised(tr["keypoints"][rows], spec["size"]),
                               tr["visible"][rows], args.ridge_alpha)
            ridge_pred = ridge_predict(te["points"], W, spec["size"])
            result = {"selected_epoch": None, "val": None, "test": landmark_metrics(
                ridge_pred, te["keypoints"], te["visible"], spec["size"], spec["eye_indices"], args.pck_int_truncation)}
        else:
            full = sources["train"]
            train = dict(full, indices=[full["indices"][r] for r in subset], store=None if full["store"] is None
                         else {k: v[torch.tensor(subset, device=v.device)] for k, v in full["store"].items()})
            head = make_head(args, channels, train_ds.num_landmarks, spec["size"], train, device)
            lr, wd = (args.few_shot_lr, args.few_shot_weight_decay) if sizes else (args.lr, args.weight_decay)
            log = lambda r: data.log(run_dir, "regress", {"annotations": n, "seed": args.seed + s, "epoch": r["epoch"],  # noqa: E731
                                                          "loss": r["loss"], f"val_{metric}": r["val"][metric]})
            result = fit(head, spec, train, sources["val"], test_src, args.protocol, lr, wd, args.epochs,
                         args.batch_size, args.select_on, args.augment, device, args.seed + s, log, amp)
        runs.append({"annotations": n, "seed": args.seed + s, **result})
        selected = f" (epoch {result['selected_epoch']}, selected on {args.select_on})" if result["val"] else ""
        print(f"N={n} seed={args.seed + s}: test {metric} {result['test'][metric]:.3f}{selected}")
    # The extractor only ever ran under no_grad and was never given to an optimiser: prove it did not change.
    assert_frozen(fingerprint, extractor.state_fingerprint())

    table = [{"annotations": n, "mean": float(np.mean(v)), "std": float(np.std(v)), "runs": len(v)}
             for n in (sizes or [n_train]) for v in [[r["test"][metric] for r in runs if r["annotations"] == n]]]
    if sizes and len(sizes) > 1:
        plot_few_shot(table, metric, os.path.join(run_dir, "few_shot.png"))
    if args.plot_images > 0:
        plot_test_images(args, spec, test_src, extractor, head, ridge_pred, os.path.join(run_dir, "predictions.png"))
    reference = None if args.task == "mask" else mean_shape_reference(*[split_keypoints(
        sources[s], points[s] if args.head == "ridge" else None) for s in ("train", "test")], spec)
    selection = ("closed form, no epochs" if args.head == "ridge" else f"epoch with the best validation {metric}"
                 if args.select_on == "val" else "last epoch (DVE's practice)" if args.select_on == "last" else
                 f"epoch with the best TEST {metric} (ContrastLandmark's practice, optimistic)")
    results = {"settings": vars(args), "extractor": meta, "metric": metric, "lower_is_better": LOWER_IS_BETTER[metric],
               "dataset": {"name": args.dataset, **{s: len(sources[s]["indices"]) for s in sources},
                           "landmark_names": list(train_ds.landmark_names), "eye_indices": train_ds.eye_indices},
               "augment": args.augment, "cached": cached, "selection": selection, "runs": runs, "table": table,
               "mean_shape": reference, "frozen_extractor_unchanged": True, "seconds": time.time() - start}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    shown = "; ".join(f"N={r['annotations']}: {r['mean']:.2f} +- {r['std']:.2f}" if sizes or args.seeds > 1
                      else f"{r['mean']:.2f}" for r in table)
    baseline = f"; the mean training shape scores {reference[metric]:.2f}" if reference else ""
    print(f"regress {args.name}: test {metric} {shown} ({args.task}, head {args.head}, protocol {args.protocol}, "
          f"{selection}{baseline}) in {time.time() - start:.0f} s -> {run_dir}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except data.DatasetError as error:  # a user's mistake (missing or malformed files): one sentence, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
