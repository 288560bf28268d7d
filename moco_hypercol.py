"""MoCo hypercolumns for object landmarks: Cheng, Su, Maji, "On Equivariant and Invariant Learning of Object
Landmark Representations", ICCV 2021, arXiv 2006.14787 (official code: ContrastLandmark).

Three stages (`--stage all` runs them in order), writing to runs/moco_hypercol/<name>/:
  pretrain  MoCo of a torchvision ResNet; exports the hypercolumn (hypercol.pt2), each of its layers alone
            (layer1.pt2 ..) and pca.png (supplement Fig. 1); `--epochs 0` exports the random network (Tab. 5);
  project   the spatial-contrastive projector on the frozen hypercolumn (proj.pt2);
  nmf       Tab. 4's baseline: NMF of the hypercolumn (nmf.pt2) and its parts (nmf_parts.png, Fig. 5).
Evaluate any exported .pt2 with regress.py (landmark regression) and match.py (matching).

Paper -> code:  Eq. 5, InfoNCE with a queue of negatives    -> info_nce, KeyQueue, moco_step
                key encoder update (MoCo, He et al. Eq. 2)  -> momentum_update, encode_in_splits (shuffle BN)
                Sec. 3.1 hypercolumn; Sec. 3.2 projector    -> Hypercolumn; Projector
                Eq. 3-4 spatial contrastive loss, x' = x    -> spatial_contrastive_loss
                Tab. 4 NMF baseline                          -> data.nmf_basis, data.NMFCoefficients
                the official views                          -> jpeg_noise, view_params, moco_views

Paper values (ContrastLandmark's code) and our CPU defaults in brackets: --arch resnet50 [resnet18; the paper
reports both] | --epochs 800 [1 epoch of the 10,000 synthetic faces] | --batch-size 256 [32] | --lr 0.03, SGD
momentum 0.9, weight decay 1e-4, cosine [same] | --moco-queue 4096, --moco-dim 128, --moco-tau 0.07 [same] |
--moco-momentum 0.999 [0.99: in runs of 300-5,000 steps 0.999 leaves the key encoder near its start] |
projector: Adam 1e-3, weight decay 5e-4, --proj-epochs 10 [1], --proj-dim 64/128/256 [64].

Deviations, each deliberate:
- Shuffle BN on one device: MoCo's keys get batch norm over per-GPU sub-batches of a shuffled batch, so that a
  query and its key never share batch statistics (a leak the network learns to exploit); here both encoders run
  --moco-bn-splits sub-batches one after another, the keys shuffled first: what that many GPUs would compute.
- The ResNet keeps its stem stride (layer1..4 are 24, 12, 6, 3 cells at 96 px), as the official code; the
  hypercolumn is resized to 48x48 (exports) or 24x24 (projector training).
- Views, in the official order: DVE's JPEG noise, random resized crop (scale 0.2-1), ColorJitter(0.4, 0.4, 0.4)
  in a random order, PCA lighting noise (std 0.1); no flip, blur or TPS. The official code crops at 136 px and
  cuts a 20 px border; we crop the 96 px image. JPEG noise (PIL) is made in the workers, the rest on the device
  a batch at a time. --moco-crop-min/--moco-jitter ablate the invariances; --moco-hue/--moco-grayscale add MoCo
  v1's. The learning rate is scheduled every step.
- Projector: the paper's map is linear; the official code adds a spatial softmax (--proj-softmax, off). The loss
  keeps the official ||u - v||^0.5 in input pixels (the paper writes ||u - v||), on un-augmented images.
- --bn-stats-images N (ours, off): export with the batch-norm statistics of N clean training images; a random
  network's are otherwise the identity in eval mode.
On a GPU, --help says what --amp auto and --deterministic do; --workers defaults to the cores.

Smallest run: `python moco_hypercol.py --train-images 512 --name tiny`: a bar and a summary line per epoch and
stage, then runs/moco_hypercol/tiny/{hypercol,proj,nmf,layer1..4}.pt2, in a few minutes on 2 CPU cores
(docs/moco_hypercol.md has the timings and what the runs give).
"""
import argparse
import copy
import io
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm import tqdm

import data

SCRIPT = "moco_hypercol"
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # conv2_x .. conv5_x in the paper's names


# ===== Settings =====
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo hypercolumns + spatial-contrastive projector (Cheng et al. "
                                "2021)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", default="all", choices=["all", "pretrain", "project", "nmf"], help="what to run; project and "
        "nmf read pretrain's --name")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="training data (see data.py)")
    add("--data-root", default=None, help="dataset folder, for real datasets only")
    add("--image-size", type=int, default=96, help="side of the square input images (the protocol uses 96)")
    add("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    add("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="torchvision backbone")
    add("--imagenet-init", action=switch, default=False, help="start from torchvision's ImageNet weights")
    add("--epochs", type=int, default=1, help="MoCo epochs (paper 800); 0: the random network (Tab. 5's baseline)")
    add("--batch-size", type=int, default=32, help="images per step, both stages (paper 256)")
    add("--lr", type=float, default=0.03, help="SGD learning rate of MoCo, cosine-decayed to 0 (paper 0.03)")
    add("--workers", type=int, default=None, help="data-loader processes; default: all cores on a GPU, 1 on a CPU")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help=data.AMP_HELP)
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help=data.DETERMINISTIC_HELP)
    add("--name", default="default", help="run name: everything goes to <runs-dir>/moco_hypercol/<name>/")
    add("--runs-dir", default="runs", help="root of the run directories")
    add("--resume", action=switch, default=False, help="continue each stage from its checkpoint")
    add("--stop-after-steps", type=int, default=0, help="checkpoint and stop a stage after N steps (0: never)")
    add("--log-every", type=int, default=10, help="show the loss every N steps (reading it waits for a GPU)")
    add("--moco-dim", type=int, default=128, help="size of the L2-normalised MoCo embedding (paper 128)")
    add("--moco-queue", type=int, default=4096, help="K, negatives in the queue (paper 4096), >= --batch-size")
    add("--moco-tau", type=float, default=0.07, help="temperature tau of Eq. 5 (paper 0.07)")
    add("--moco-momentum", type=float, default=0.99, help="m of the key encoder (paper 0.999; lower: short runs)")
    add("--moco-bn-splits", type=int, default=2, help="sub-batches with their own batch norm (shuffle BN); 1: off")
    add("--moco-crop-min", type=float, default=0.2, help="smallest area of the random resized crop (1: no crop)")
    add("--moco-jitter", type=float, default=0.4, help="brightness, contrast and saturation jitter (0: none)")
    add("--moco-hue", type=float, default=0.0, help="hue jitter (MoCo v1: 0.4): removes the colour shortcut")
    add("--moco-grayscale", type=float, default=0.0, help="probability of a grayscale view (MoCo v1: 0.2)")
    add("--bn-stats-images", type=int, default=0, help="export with batch-norm statistics of N clean images (0: "
        "those of training, the identity for --epochs 0); compare networks at one value")
    add("--layers", default="layer4,layer3,layer2,layer1", help="hypercolumn layers, deepest first")
    add("--proj-dim", type=int, default=64, help="d, output channels of the projector (paper 64/128/256)")
    add("--proj-softmax", action=switch, default=False, help="the official code's spatial softmax of 7 x output")
    add("--proj-epochs", type=int, default=1, help="projector epochs (paper 10)")
    add("--proj-lr", type=float, default=1e-3, help="Adam learning rate of the projector (paper 1e-3)")
    add("--nmf-k", type=int, default=64, help="NMF components (= --proj-dim: Tab. 4; ~8: readable Fig. 5)")
    add("--nmf-images", type=int, default=64, help="training images whose 24x24 hypercolumns NMF factorises")
    add("--nmf-iters", type=int, default=200, help="multiplicative updates (the exports use a quarter per image)")
    args = p.parse_args(argv)
    args.layers = args.layers.split(",")
    if not set(args.layers) <= set(LAYERS):
        p.error(f"--layers takes comma-separated names from {', '.join(LAYERS)}")
    if args.moco_queue < args.batch_size or args.batch_size % args.moco_bn_splits:
        p.error("--moco-queue must hold a batch of keys and --batch-size must split into --moco-bn-splits")
    return args


# ===== Model =====
def build_resnet(arch, out_dim, imagenet=False):
    """A torchvision ResNet whose fc maps the pooled features to the `out_dim`-d embedding (MoCo v1: no MLP)."""
    net = data.torchvision_model(arch, imagenet)
    net.fc = nn.Linear(net.fc.in_features, out_dim)
    return net


@torch.no_grad()
def momentum_update(key_model, model, m):
    """theta_k <- m theta_k + (1 - m) theta_q in one fused call; buffers (batch-norm statistics) stay the key's own."""
    torch._foreach_lerp_(list(key_model.parameters()), list(model.parameters()), 1 - m)


def encode_in_splits(encoder, images, splits, order=None):
    """Encode `splits` sub-batches one after another so that batch norm sees one sub-batch at a time (the
    single-device shuffle BN). `order` shuffles the batch first; the outputs come back in the input order."""
    if order is not None:
        images = images[order]
    out = torch.cat([encoder(chunk) for chunk in images.chunk(splits)])  # N x dim
    return out if order is None else out[torch.argsort(order)]


class KeyQueue(nn.Module):
    """MoCo's dictionary of negatives: the K most recent keys in a ring buffer, the oldest overwritten first."""
    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x dim, random until filled
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # where the next key goes

    @torch.no_grad()
    def push(self, keys):  # keys: N x dim with N <= K
        slots = (self.ptr + torch.arange(len(keys), device=keys.device)) % len(self.keys)  # wraps around
        self.keys[slots] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + len(keys)) % len(self.keys))


@torch.no_grad()
def measure_bn_stats(model, images, batch_size):
    """--bn-stats-images: every batch norm's running statistics become plain averages over the batches of `images`
    (normalised, B x 3 x H x W); the weights do not change. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches instead of an exponential one
    for x in images.split(batch_size):
        model.train()(x)
    for bn in norms:
        bn.momentum = 0.1  # torchvision's
    return model.eval()


class Hypercolumn(nn.Module):
    """Sec. 3.1: the outputs of `layers`, each resized bilinearly to size x size and concatenated in the given
    order (deepest first: 960-d for ResNet-18, 3840-d for ResNet-50). Input: normalised (B, 3, H, W)."""
    def __init__(self, resnet, layers, size):
        super().__init__()
        self.body = create_feature_extractor(resnet, return_nodes=list(layers))  # shares resnet's weights
        self.layers, self.size = list(layers), size
        self.widths = [getattr(resnet, name)[-1].conv1.in_channels for name in layers]  # = a layer's output
        ends = np.cumsum([0] + self.widths).tolist()
        self.groups = [[name, a, b] for name, a, b in zip(self.layers, ends, ends[1:])]  # for the exports

    def forward(self, x):
        maps = self.body(x.contiguous(memory_format=torch.channels_last))  # the faster layout on CPU and GPU
        return torch.cat([F.interpolate(maps[name], size=(self.size, self.size), mode="bilinear")
                          for name in self.layers], 1)  # B x C x size x size


class Projector(nn.Module):
    """Sec. 3.2: a 1x1 convolution C -> d over the frozen hypercolumn (+ the official spatial softmax)."""
    def __init__(self, channels, dim, softmax):
        super().__init__()
        self.conv, self.softmax = nn.Conv2d(channels, dim, 1), softmax

    def forward(self, h):  # h: B x C x h x w
        y = self.conv(h)  # B x d x h x w
        return (7 * y).flatten(2).softmax(-1).view_as(y) if self.softmax else y


# ===== Losses =====
def info_nce(q, k, queue, tau):
    """Eq. 5: -log exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_j exp(q.k_j / tau)), averaged over the batch.
    q, k: N x dim, L2-normalised queries and their positive keys; queue: K x dim negatives k_j."""
    l_pos = (q * k).sum(1, keepdim=True)  # N x 1
    l_neg = q @ queue.T  # N x K
    logits = torch.cat([l_pos, l_neg], 1) / tau  # N x (1+K); the positive is class 0
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def spatial_contrastive_loss(f, stride, tau=1 / 7, power=0.5):
    """Eq. 3-4 with x' = x: p(v|u) = softmax_v(cos(f_u, f_v) / tau) over the locations v of the same image and
    loss = mean_u sum_v ||u - v||^power p(v|u), distances in input pixels (`stride` pixels per cell). It is low
    when each location's feature is similar to its own and its near neighbours' only. f: B x d x h x w."""
    h, w = f.shape[-2:]
    f = F.normalize(f.flatten(2).float(), dim=1)  # B x d x hw
    p = (f.transpose(1, 2) @ f / tau).softmax(-1)  # B x hw(u) x hw(v)
    ys, xs = torch.meshgrid(torch.arange(h, device=f.device), torch.arange(w, device=f.device), indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten()], 1).float() * stride  # hw x 2, in pixels
    return (p * torch.cdist(cells, cells) ** power).sum(-1).mean()


# ===== Views =====
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])  # ImageNet's RGB principal components (AlexNet lighting)
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def jpeg_noise(image, g):
    """DVE's JPEG noise on a uint8 (3, H, W) image: rescale to a random size (at least 0.8x), compress at quality
    30-98, rescale back; with PIL, as the official code (torchvision's JPEG codec is deprecated)."""
    _, height, width = image.shape
    side = max(int(0.8 * width), int(width * (1 + 0.5 * torch.randn((), generator=g).item())))
    quality = int(30 + 69 * torch.rand((), generator=g).item())
    buffer = io.BytesIO()
    TF.to_pil_image(image).resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=quality)
    return TF.pil_to_tensor(Image.open(buffer).resize((width, height), Image.BILINEAR))


class Images(data.Uint8Images):
    """The workers' share of MoCo's views: (epoch, index) -> two uint8 (3, H, W) copies of the image ("query",
    "key"), each with its own JPEG noise from data.generator(seed, epoch, index)."""
    def __init__(self, dataset, seed):
        super().__init__(dataset)
        self.seed = seed

    def __getitem__(self, key):
        image, g = super().__getitem__(key)["image"], data.generator(self.seed, *key)
        return {"query": jpeg_noise(image, g), "key": jpeg_noise(image, g)}


def view_params(n, height, width, g, crop_min=0.2, jitter=0.4, hue=0.0, grayscale=0.0):
    """Parameters of n views, drawn per sample on the CPU from g: torchvision's RandomResizedCrop box (top, left, h,
    w; area in [crop_min, 1], ratio 3/4-4/3, 10 tries, then the whole image), ColorJitter's factors (1 +- jitter,
    hue +-hue) and order, grayscale with p `grayscale`, lighting alpha ~ N(0, 0.1^2)."""
    area = height * width * (crop_min + (1 - crop_min) * torch.rand(n, 10, generator=g))  # n x 10 tries
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, 10, generator=g))
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    h, w = [torch.where(fits.any(1), s.gather(1, first)[:, 0], full) for s, full in ((h, height), (w, width))]
    top, left = [(torch.rand(n, generator=g) * (side - s + 1)).floor() for side, s in ((height, h), (width, w))]
    factors = torch.cat([1 - jitter + 2 * jitter * torch.rand(n, 3, generator=g),
                         hue * (2 * torch.rand(n, 1, generator=g) - 1)], 1)  # n x 4
    return {"box": torch.stack([top, left, h, w], 1), "factors": factors,
            "order": torch.rand(n, 4 if hue else 3, generator=g).argsort(1),  # n x 3|4, a permutation per view
            "gray": torch.rand(n, generator=g) < grayscale, "alpha": 0.1 * torch.randn(n, 3, generator=g)}


def moco_views(images, p):
    """The views of uint8 images (n x 3 x H x W) with the params `p` of view_params, on their device: float, about
    [0, 1] (the lighting noise may leave it), as torchvision's per-image ops (tested)."""
    n, _, height, width = images.shape
    top, left, h, w = p["box"].unbind(1)  # n each

    def axis(start, length, size):  # n x size: each output pixel's source, clamped into the crop, in [-1, 1]
        src = (torch.arange(size, device=images.device) + 0.5) * (length / size)[:, None] - 0.5
        return (2 * (start[:, None] + torch.clamp(src, torch.zeros_like(src), (length - 1)[:, None])) + 1) / size - 1

    xs, ys = axis(left, w, width), axis(top, h, height)  # n x W, n x H
    grid = torch.stack([xs[:, None, :].expand(n, height, width), ys[:, :, None].expand(n, height, width)], -1)
    x = F.grid_sample(images.float().div_(255), grid, align_corners=False)  # n x 3 x H x W: crop and resize at once
    for r in range(p["order"].shape[1]):  # ColorJitter: each view applies its own r-th adjustment
        op = p["order"][:, r].view(n, 1, 1, 1)  # 0 brightness, 1 contrast, 2 saturation, 3 hue
        f = p["factors"].gather(1, op.view(n, 1)).view(n, 1, 1, 1)
        gray = TF.rgb_to_grayscale(x)  # n x 1 x H x W
        # brightness, contrast and saturation blend the image with black, its mean grey and its grey
        other = torch.where(op == 1, gray.mean((1, 2, 3), keepdim=True), gray) * (op != 0)
        blend = torch.lerp(other, x, f).clamp_(0, 1)  # f x + (1 - f) other
        x = torch.where(op == 3, data.adjust_hue(x, f), blend) if p["order"].shape[1] == 4 else blend
    x = torch.where(p["gray"].view(n, 1, 1, 1), TF.rgb_to_grayscale(x).expand_as(x), x)
    lighting = (p["alpha"] * PCA_EIGVAL.to(x)) @ PCA_EIGVEC.to(x).T  # n x 3, AlexNet's PCA colour noise
    return x + lighting.view(n, 3, 1, 1)


# ===== Training loop =====
def train(args, stage, run, loader, step_fn, state, epochs, device):
    """`step_fn(batch, generator) -> loss` for `epochs` epochs, a bar, log line and checkpoint each. Resume loads
    `state` and the step only: every random draw is a function of (seed, epoch, index) or (seed, step)."""
    path, step = os.path.join(run, f"checkpoint_{stage}.pt"), 0
    if args.resume and os.path.exists(path):
        checkpoint = data.load_checkpoint(path)
        for key, obj in state.items():
            obj.load_state_dict(checkpoint["state"][key])
        step = checkpoint["step"]
    per_epoch = loader.batch_sampler.n // loader.batch_sampler.batch_size  # steps per epoch
    if per_epoch == 0 and epochs > 0:
        raise SystemExit(f"error: {loader.batch_sampler.n} training images do not fill a batch; lower --batch-size")

    def save(): data.save_checkpoint(path, state={k: o.state_dict() for k, o in state.items()}, step=step,
                                     args=vars(args))
    for epoch in range(step // max(per_epoch, 1), epochs):
        loader.batch_sampler.epoch, loader.batch_sampler.start = epoch, step % per_epoch
        total, start, done = torch.zeros((), device=device), time.time(), step % per_epoch
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", initial=done, total=per_epoch)
        for batch in bar:
            loss = step_fn(data.to_device(batch, device), data.generator(args.seed, step))  # a tensor: no sync
            total, step = total + loss.detach(), step + 1
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")  # the only host sync of a step
            if step == args.stop_after_steps:
                save()
                print(f"{stage}: stopped after step {step} (--stop-after-steps); continue with --resume")
                return False
        n, seconds = per_epoch - done, time.time() - start
        data.log(run, stage, {"stage": stage, "epoch": epoch + 1, "step": step, "loss": total.item() / n,
                              "lr": state["optimizer"].param_groups[0]["lr"], "seconds": round(seconds, 1),
                              "images_per_s": round(n * loader.batch_sampler.batch_size / seconds, 1)})
        save()
    save()  # also for --epochs 0: later stages read this checkpoint
    return True


def update(loss, optimizer, scaler):
    """One optimiser step on `loss`; the scaler scales it only for fp16 (data.grad_scaler)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def moco_step(state, view_q, view_k, g, args, dtype):
    """One MoCo step (Eq. 5) on the normalised views N x 3 x S x S of N images; returns the loss, a tensor."""
    model, key_model, queue = state["model"], state["key_model"], state["queue"]
    with data.autocast(view_q.device, dtype):
        q = F.normalize(encode_in_splits(model, view_q, args.moco_bn_splits).float(), dim=1)  # N x dim
        with torch.no_grad():
            momentum_update(key_model, model, args.moco_momentum)
            order = torch.randperm(len(view_k), generator=g)  # shuffle BN: the keys go to other splits
            order = order.to(view_k.device, non_blocking=True)
            k = F.normalize(encode_in_splits(key_model, view_k, args.moco_bn_splits, order).float(), dim=1)
    loss = info_nce(q, k, queue.keys, args.moco_tau)  # Eq. 5
    update(loss, state["optimizer"], state["scaler"])
    state["scheduler"].step()
    queue.push(k)  # the newest keys replace the oldest negatives
    return loss.detach()


# ===== Exports and pictures =====
def export(module, run, variant, info, args, groups):
    """Write <run>/<variant>.pt2: a frozen extractor of dense features from [0, 1] images (data.save_extractor)."""
    module = copy.deepcopy(module).float().cpu().eval().to(memory_format=torch.contiguous_format)
    meta = {"input_size": [args.image_size] * 2, "kind": "features", "method": SCRIPT, "variant": variant,
            "channel_groups": groups, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs}
    meta = data.save_extractor(module, os.path.join(run, f"{variant}.pt2"), meta, info.mean, info.std)
    print(f"exported {os.path.join(run, variant)}.pt2: {meta['channels']} x {meta['output_size']} features")


def load_backbone(run, device):
    """The MoCo query encoder from this run's checkpoint_pretrain.pt, frozen and in eval mode, with the batch-norm
    statistics the pretraining stage exported it with (the clean-image ones of --bn-stats-images, if set)."""
    path = os.path.join(run, "checkpoint_pretrain.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no pretrained backbone at {path}; run --stage pretrain with this --name first")
    checkpoint = data.load_checkpoint(path)
    model = build_resnet(checkpoint["args"]["arch"], checkpoint["args"]["moco_dim"])
    model.load_state_dict({**checkpoint["state"]["model"], **checkpoint.get("bn_stats", {})})
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ===== Main =====
def main(argv=None):
    args = get_args(argv)
    device = data.choose_device(args.device)
    dtype = data.amp_dtype(device, args.amp)
    workers = data.default_workers(device) if args.workers is None else args.workers
    info, train_set = data.training_images(args.dataset, args.data_root, args.image_size, args.train_images)
    normalize = data.Normalize(info.mean, info.std).to(device)
    figure_images = data.first_images(train_set, 8)  # 8 x 3 x H x W
    grid = args.image_size // 2  # the exports' hypercolumn grid: 48x48 at 96 px, as in the official code
    stages = ["pretrain", "project", "nmf"] if args.stage == "all" else [args.stage]

    if "pretrain" in stages:  # ---- MoCo, Eq. 5 ---------------------------------------------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "pretrain", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        model = build_resnet(args.arch, args.moco_dim, args.imagenet_init).to(device, memory_format=torch.channels_last)
        key_model = copy.deepcopy(model).requires_grad_(False)  # starts equal, then follows by momentum only
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        loader = data.make_loader(Images(train_set, args.seed), args.batch_size, args.seed, workers, device)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs * len(loader), 1))
        state = dict(model=model, key_model=key_model, queue=KeyQueue(args.moco_queue, args.moco_dim).to(device),
                     optimizer=optimizer, scheduler=scheduler, scaler=data.grad_scaler(device, dtype))

        def step_fn(batch, g):  # batch: the JPEG-noised uint8 images, "query" and "key", N x 3 x S x S each
            images = torch.cat([batch["query"], batch["key"]])  # 2N x 3 x S x S: all views in one go
            params = view_params(len(images), args.image_size, args.image_size, g, args.moco_crop_min,
                                      args.moco_jitter, args.moco_hue, args.moco_grayscale)
            views = normalize(moco_views(images, data.to_device(params, device)))
            return moco_step(state, *views.chunk(2), g, args, dtype)

        if not train(args, "pretrain", run, loader, step_fn, state, args.epochs, device):
            return
        model.eval()
        if args.bn_stats_images:  # clean images' statistics, kept beside the training state (--resume needs it)
            images = normalize(data.first_images(train_set, args.bn_stats_images).to(device))
            stats = measure_bn_stats(model, images, args.batch_size).state_dict()
            stats = {k: v for k, v in stats.items() if "running_" in k}
            path = os.path.join(run, "checkpoint_pretrain.pt")
            data.save_checkpoint(path, **{**data.load_checkpoint(path), "bn_stats": stats})
        hyper = Hypercolumn(model, args.layers, grid)
        export(hyper, run, "hypercol", info, args, hyper.groups)
        for name in args.layers if len(args.layers) > 1 else []:  # each layer alone (Tab. 3)
            layer = Hypercolumn(model, [name], grid)
            export(layer, run, name, info, args, layer.groups)
        with torch.no_grad():  # the first 3 principal components of the hypercolumn as RGB (supplement Fig. 1)
            pca = data.pca_rgb(hyper(normalize(figure_images.to(device))))  # 8 x 3 x 48 x 48
        data.save_pictures(os.path.join(run, "pca.png"), figure_images, pca)

    if "project" in stages:  # ---- spatial-contrastive projector, Eq. 3-4 ---------------------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "project", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(run, device)
        hyper = Hypercolumn(backbone, args.layers, args.image_size // 4)  # 24x24 at 96 px
        projector = Projector(sum(hyper.widths), args.proj_dim, args.proj_softmax).to(device)
        optimizer = torch.optim.Adam(projector.parameters(), lr=args.proj_lr, weight_decay=5e-4)
        loader = data.make_loader(data.Uint8Images(train_set), args.batch_size, args.seed, workers, device)
        state = dict(projector=projector, optimizer=optimizer, scaler=data.grad_scaler(device, dtype))

        def step_fn(batch, g):  # un-augmented images, x' = x: g draws nothing here
            with torch.no_grad(), data.autocast(device, dtype):
                h = hyper(normalize(batch["image"].float() / 255)).float()  # B x C x 24 x 24, frozen
            loss = spatial_contrastive_loss(projector(h), stride=args.image_size / hyper.size)
            update(loss, optimizer, state["scaler"])
            return loss.detach()

        if not train(args, "project", run, loader, step_fn, state, args.proj_epochs, device):
            return
        export(nn.Sequential(Hypercolumn(backbone, args.layers, grid), projector), run, "proj", info, args,
               [["proj", 0, args.proj_dim]])

    if "nmf" in stages:  # ---- NMF baseline, Tab. 4 and Fig. 5 (deterministic and quick: no resume) --------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "nmf", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(run, device)
        hyper = Hypercolumn(backbone, args.layers, args.image_size // 4)
        images = data.first_images(train_set, args.nmf_images)
        with torch.no_grad(), data.autocast(device, dtype):  # n x C x 24 x 24, >= 0 after ReLU and resizing
            v = torch.cat([hyper(normalize(x.to(device))).float() for x in images.split(args.batch_size)])
        basis, record = data.nmf_basis(v, args.nmf_k, args.nmf_iters, args.seed)
        data.log(run, "nmf", {"stage": "nmf", **record})
        data.save_checkpoint(os.path.join(run, "checkpoint_nmf.pt"), state={"basis": basis.cpu()}, args=vars(args))
        extractor = nn.Sequential(Hypercolumn(backbone, args.layers, grid),
                                  data.NMFCoefficients(basis, args.nmf_iters // 4))
        export(extractor, run, "nmf", info, args, [["nmf", 0, args.nmf_k]])
        with torch.no_grad():  # Fig. 5: each location coloured by its strongest NMF component
            parts = extractor(normalize(figure_images.to(device))).argmax(1).cpu()  # 8 x 48 x 48
        palette = torch.rand(args.nmf_k, 3, generator=data.generator(0))  # a colour per part
        small = F.interpolate(figure_images, size=(grid, grid), mode="bilinear", antialias=True)
        data.save_pictures(os.path.join(run, "nmf_parts.png"), figure_images,
                           0.4 * small + 0.6 * palette[parts].permute(0, 3, 1, 2))


if __name__ == "__main__":
    main()
