"""MoCo hypercolumns for object landmarks: Cheng, Su, Maji, "On Equivariant and Invariant Learning of Object
Landmark Representations", ICCV 2021, arXiv 2006.14787 (official code: ContrastLandmark).

Three stages; `--stage all` (the default) runs them in order, writing to runs/moco_hypercol/<name>/:
  pretrain  instance-contrastive MoCo of a torchvision ResNet (features invariant across views); exports the
            hypercolumn (hypercol.pt2), each of its layers alone (layer1.pt2 .. layer4.pt2) and a PCA picture
            of the hypercolumn (pca.png, supplement Fig. 1). `--epochs 0` exports the random-initialised
            network instead: the baseline of Tab. 5 is one flag away;
  project   the spatial-contrastive projector on the frozen hypercolumn (features distinct across locations,
            hence equivariant), exported as proj.pt2;
  nmf       the unsupervised NMF baseline of Tab. 4 (nmf.pt2) and its part maps (nmf_parts.png, Fig. 5).
Evaluate any exported .pt2 with regress.py (landmark regression) and match.py (matching).

Paper -> code:  Eq. 5, InfoNCE with a queue of negatives    -> info_nce, KeyQueue
                key encoder update (MoCo, He et al. Eq. 2)  -> momentum_update, encode_in_splits (shuffle BN)
                Sec. 3.1 hypercolumn                        -> Hypercolumn
                Eq. 3-4 spatial contrastive loss, x' = x    -> spatial_contrastive_loss, Projector
                Tab. 4 / Fig. 5 NMF baseline                -> nmf, NMFCoefficients
                the official views                          -> moco_view, TwoViews

Paper values (ContrastLandmark's code, ../shared/PROTOCOL.md section 7) next to our CPU defaults:
  --arch resnet50 (default resnet18: 4x cheaper; the paper reports both) | --epochs 800 (default 1 epoch of
  the 10,000 synthetic faces, 312 steps: training and evaluation fit in about 10 minutes on 2 CPU cores) |
  --batch-size 256 (32) | --lr 0.03, SGD momentum 0.9, weight decay 1e-4, cosine (same) | --moco-queue 4096,
  --moco-dim 128, --moco-tau 0.07 (same) | --moco-momentum 0.999 (0.99: in a run of 300-5,000 steps 0.999 leaves
  the key encoder close to its random initialisation) | projector: Adam 1e-3, weight decay 5e-4, --proj-epochs 10
  (1), --proj-dim 64/128/256 (64).

Deviations, each deliberate:
- Shuffle BN on one device. MoCo computes keys with batch norm over per-GPU sub-batches of a *shuffled* batch,
  so that a query and its key never share batch statistics (a leak the network learns to exploit). On one
  device both encoders run their --moco-bn-splits sub-batches one after another (encode_in_splits), the keys
  shuffled first: what that many GPUs would compute. --moco-bn-splits 1 is plain batch norm, with the leak.
- The ResNet keeps its stem stride, as the official code does: at 96 px layer1..layer4 are 24, 12, 6 and 3
  cells wide; the hypercolumn resizes them to 48x48 (exports, for regression) or 24x24 (projector training).
- Views, in the official order: DVE's JPEG noise (random rescale, quality 30-98, rescale back), random resized
  crop (scale 0.2-1), ColorJitter(0.4, 0.4, 0.4), PCA lighting noise (std 0.1); no flip, blur or TPS. The
  official code crops at 136 px and then cuts a 20 px border; our images arrive as the final 96 px crop, so the
  crop is taken from them directly. A view is a pure function of (seed, epoch, image index), drawn in the
  data-loader workers: resume is exact. --moco-crop-min and --moco-jitter (defaults: the official 0.2 and 0.4)
  exist for ablations of the two invariances; --moco-hue and --moco-grayscale add MoCo v1's.
- The cosine schedule steps every iteration rather than every epoch (runs here last a few epochs).
- Projector: the paper describes a linear map; the official code adds a per-channel spatial softmax of
  7 x output: off by default, --proj-softmax turns it on. The loss keeps the official distance ||u - v||^0.5
  in input pixels (the paper writes ||u - v||). It is trained on un-augmented images.
- NMF: multiplicative updates (Lee & Seung) on the 24x24 hypercolumns of --nmf-images training images; the
  exported extractor solves each location's coefficients with the same updates, the basis fixed.
- --bn-stats-images N (ours; off, as the paper): batch-norm statistics measured on N clean training images before
  the exports. Without it a random network's batch norms are the identity in eval mode (docs/moco_hypercol.md).

Smallest run: `python moco_hypercol.py --train-images 512 --name tiny`: a bar per epoch and a summary line per
epoch and stage, then runs/moco_hypercol/tiny/*.pt2, in a few minutes on 2 CPU cores. The default run (312 MoCo
steps, 312 projector steps, NMF of 64 images) took 4.9 minutes on an idle 2-core CPU: MoCo 2.8 min (59 images/s;
tests/bench_moco_hypercol.py measures the step), projector 1.5 min, NMF 15 s. What it gives (the projector matches
across identities better than the hypercolumn, at every seed tried from --epochs 2 on; MoCo's hypercolumn regresses
better than the random network's on the wild faces, worse on the aligned ones unless both get measured batch-norm
statistics) and why: README and docs/.
"""
import argparse
import copy
import io
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm import tqdm

import data

LAYERS = ("layer1", "layer2", "layer3", "layer4")  # conv2_x .. conv5_x in the paper's names


# =========================================================================================================
# Settings
# =========================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo hypercolumns + spatial-contrastive projector (Cheng et al. "
                                "2021)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", default="all", choices=["all", "pretrain", "project", "nmf"],
        help="what to run; project and nmf read the pretrained backbone of the same --name")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="training data (see data.py)")
    add("--data-root", default=None, help="dataset folder, for real datasets only")
    add("--image-size", type=int, default=96, help="side of the square input images (the protocol uses 96)")
    add("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    add("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="torchvision backbone")
    add("--imagenet-init", action=switch, default=False, help="start from torchvision's ImageNet weights")
    add("--epochs", type=int, default=1, help="MoCo epochs (paper 800); 0 exports the random-initialised "
        "network, the baseline of Tab. 5; 1 fits a 10-minute CPU run, 2-3 show the projector's gain reliably")
    add("--batch-size", type=int, default=32, help="images per step, both stages (paper 256)")
    add("--lr", type=float, default=0.03, help="SGD learning rate of MoCo, cosine-decayed to 0 (paper 0.03)")
    add("--workers", type=int, default=1, help="data-loader processes; they render and augment the images")
    add("--amp", default="auto", choices=["auto", "bf16", "none"], help="bfloat16 autocast; auto: on cpu and "
        "cuda (1.6-1.9x faster on a CPU, same results)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help="bit-exact reruns and resumes (slower on GPUs)")
    add("--name", default="default", help="run name: everything goes to <runs-dir>/moco_hypercol/<name>/")
    add("--runs-dir", default="runs", help="root of the run directories")
    add("--resume", action=switch, default=False, help="continue each stage from its checkpoint")
    add("--stop-after-steps", type=int, default=0, help="checkpoint and stop a stage after this many steps "
        "(0: never); simulates an interruption")
    add("--moco-dim", type=int, default=128, help="size of the L2-normalised MoCo embedding (paper 128)")
    add("--moco-queue", type=int, default=4096, help="K, negatives kept in the queue (paper 4096); at least "
        "--batch-size")
    add("--moco-tau", type=float, default=0.07, help="temperature tau of Eq. 5 (paper 0.07)")
    add("--moco-momentum", type=float, default=0.99, help="m of the key encoder (paper 0.999 for 800 epochs); "
        "lower it for short runs so that the keys keep up with the queries")
    add("--moco-bn-splits", type=int, default=2, help="sub-batches with their own batch norm (single-device "
        "shuffle BN); 1 lets a query and its key share statistics")
    add("--moco-crop-min", type=float, default=0.2, help="smallest area fraction of the random resized crop "
        "(official 0.2; 1 keeps the whole image: an ablation of the crop invariance)")
    add("--moco-jitter", type=float, default=0.4, help="brightness, contrast and saturation jitter of the views "
        "(official 0.4; 0 turns it off: an ablation of the colour invariance)")
    add("--moco-hue", type=float, default=0.0, help="hue jitter of the views (MoCo v1: 0.4; the official views have "
        "none): removes the colour shortcut of instance discrimination")
    add("--moco-grayscale", type=float, default=0.0, help="probability of a grayscale view (MoCo v1: 0.2; the "
        "official views have none)")
    add("--bn-stats-images", type=int, default=0, help="after pretraining, measure every batch norm's statistics on "
        "this many clean training images (no gradients, weights unchanged) for the exports and the later stages; 0 "
        "keeps the running averages of training, which for --epochs 0 are the identity: compare networks at one value")
    add("--layers", default="layer4,layer3,layer2,layer1", help="hypercolumn layers, deepest first")
    add("--proj-dim", type=int, default=64, help="d, output channels of the projector (paper 64/128/256)")
    add("--proj-softmax", action=switch, default=False, help="the official code's per-channel spatial softmax "
        "of 7 x output after the projector (the paper's map is linear)")
    add("--proj-epochs", type=int, default=1, help="projector epochs (paper 10)")
    add("--proj-lr", type=float, default=1e-3, help="Adam learning rate of the projector (paper 1e-3)")
    add("--nmf-k", type=int, default=64, help="NMF components: --proj-dim compares with the projector (Tab. 4), "
        "~8 gives readable part maps (Fig. 5)")
    add("--nmf-images", type=int, default=64, help="training images whose 24x24 hypercolumns NMF factorises")
    add("--nmf-iters", type=int, default=200, help="multiplicative updates of the fit (the exported extractor "
        "uses a quarter of them per image)")
    args = p.parse_args(argv)
    args.layers = args.layers.split(",")
    if not set(args.layers) <= set(LAYERS):
        p.error(f"--layers takes comma-separated names from {', '.join(LAYERS)}")
    if args.moco_queue < args.batch_size or args.batch_size % args.moco_bn_splits:
        p.error("--moco-queue must hold a batch of keys and --batch-size must split into --moco-bn-splits")
    return args


# =========================================================================================================
# Model: the ResNet and its momentum copy, the queue of keys, the hypercolumn, the projector, NMF
# =========================================================================================================
def build_resnet(arch, out_dim, imagenet=False):
    """A torchvision ResNet whose fc maps the pooled features to the `out_dim`-d embedding (MoCo v1: no MLP)."""
    try:
        net = torchvision.models.get_model(arch, weights="IMAGENET1K_V1" if imagenet else None)
    except Exception as error:  # offline and not cached
        raise SystemExit(f"error: the ImageNet weights of {arch} could not be downloaded ({type(error).__name__}) "
                         f"nor found in {torch.hub.get_dir()}/checkpoints; run once online or drop --imagenet-init")
    net.fc = nn.Linear(net.fc.in_features, out_dim)
    return net


@torch.no_grad()
def momentum_update(key_model, model, m):
    """theta_k <- m theta_k + (1 - m) theta_q; buffers (batch-norm statistics) stay the key encoder's own."""
    for p_k, p_q in zip(key_model.parameters(), model.parameters()):
        p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)


def encode_in_splits(encoder, images, splits, order=None):
    """Encode `splits` sub-batches one after another so that batch norm sees one sub-batch at a time (the
    single-device shuffle BN). `order` shuffles the batch first; the outputs come back in the input order."""
    if order is not None:
        images = images[order]
    out = torch.cat([encoder(chunk) for chunk in images.chunk(splits)])  # N x dim
    return out if order is None else out[torch.argsort(order)]


@torch.no_grad()
def measure_bn_stats(model, images, batch_size):
    """Set every batch norm's running mean and variance to their plain averages over the batches of `images`
    (normalised, B x 3 x H x W) in train mode, then return the model in eval mode; the weights do not change.
    Training leaves running averages of augmented views; a random network has mean 0 and variance 1, so that in
    eval mode its batch norms do nothing (docs/moco_hypercol.md measures what that does to the hypercolumn)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches instead of an exponential one
    model.train()
    for x in images.split(batch_size):
        model(x)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    return model.eval()


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
        maps = self.body(x.contiguous(memory_format=torch.channels_last))  # resizing is much faster so
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


def nmf(V, k, iters, basis=None, generator=None):
    """V ~ W H with W, H >= 0 (V: n x C, W: n x k, H: k x C) by Lee and Seung's multiplicative updates. Given a
    `basis` H, only the coefficients W are solved for (the exported extractor does this for every image)."""
    scale = (V.mean() / k).sqrt()  # sklearn's initialisation scale
    W, H = torch.ones_like(V[:, :1]).repeat(1, k) * scale, basis  # ones_like keeps the batch size dynamic
    if basis is None:  # random H breaks the symmetry between components
        H = torch.rand(k, V.shape[1], generator=generator).to(V) * scale
    VHt, HHt = V @ H.T, H @ H.T  # n x k, k x k: all that W's update needs from V and H
    for _ in range(iters):
        if basis is None:
            H = H * (W.T @ V) / (W.T @ W @ H + 1e-8)
            VHt, HHt = V @ H.T, H @ H.T
        W = W * VHt / (W @ HHt + 1e-8)
    return W, H


class NMFCoefficients(nn.Module):
    """Hypercolumn (B, C, h, w) -> its NMF coefficients (B, k, h, w) for a fixed basis (k x C)."""

    def __init__(self, basis, iters):
        super().__init__()
        self.register_buffer("basis", basis)
        self.iters = iters

    def forward(self, v):
        b, c, h, w = v.shape
        W, _ = nmf(v.permute(0, 2, 3, 1).reshape(-1, c).float(), len(self.basis), self.iters, self.basis)
        return W.reshape(b, h, w, -1).permute(0, 3, 1, 2)


# =========================================================================================================
# Losses
# =========================================================================================================
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
    b, d, h, w = f.shape
    f = F.normalize(f.flatten(2).float(), dim=1)  # B x d x hw
    p = (f.transpose(1, 2) @ f / tau).softmax(-1)  # B x hw(u) x hw(v)
    ys, xs = torch.meshgrid(torch.arange(h, device=f.device), torch.arange(w, device=f.device), indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten()], 1).float() * stride  # hw x 2, in pixels
    return (p * torch.cdist(cells, cells) ** power).sum(-1).mean()


# =========================================================================================================
# Method-specific augmentations: the official MoCo views
# =========================================================================================================
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])  # ImageNet's RGB principal components (AlexNet lighting)
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def moco_view(image, size, g, crop_min=0.2, jitter=0.4, hue=0.0, grayscale=0.0):
    """A random view of a uint8 (3, H, W) image drawn with the generator g, in the official order: JPEG noise,
    random resized crop (area fraction crop_min-1), colour jitter of strength `jitter`, PCA lighting noise.
    Returns float (3, size, size), about [0, 1]. The defaults are the official views; `hue` > 0 adds hue jitter
    and `grayscale` > 0 random grayscale, as MoCo v1."""
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    _, height, width = image.shape
    # DVE's JPEG noise: rescale to a random size (at least 0.8x), compress at quality 30-98, rescale back (with
    # PIL, as the official code; torchvision's JPEG codec is deprecated)
    side = max(int(0.8 * width), int(width * (1 + 0.5 * torch.randn((), generator=g).item())))
    buffer = io.BytesIO()
    TF.to_pil_image(image).resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=int(uniform(30, 99)))
    image = TF.pil_to_tensor(Image.open(buffer).resize((width, height), Image.BILINEAR))
    box = (0, 0, height, width)  # torchvision's RandomResizedCrop(scale crop_min-1): 10 tries, then the whole image
    for _ in range(10):
        area, ratio = height * width * uniform(crop_min, 1), np.exp(uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if w <= width and h <= height:
            box = (int(uniform(0, height - h + 1)), int(uniform(0, width - w + 1)), h, w)
            break
    image = TF.resized_crop(image, *box, [size, size], antialias=True).float() / 255
    adjustments = [(TF.adjust_brightness, 1 - jitter, 1 + jitter), (TF.adjust_contrast, 1 - jitter, 1 + jitter),
                   (TF.adjust_saturation, 1 - jitter, 1 + jitter),
                   (TF.adjust_hue, -hue, hue)][:4 if hue else 3]  # ColorJitter(jitter x 3[, hue]), random order
    for i in torch.randperm(len(adjustments), generator=g).tolist():
        adjust, low, high = adjustments[i]
        image = adjust(image, uniform(low, high))
    if uniform(0, 1) < grayscale:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    alpha = torch.randn(3, generator=g) * 0.1  # PCA lighting noise
    return image + (PCA_EIGVEC @ (alpha * PCA_EIGVAL)).view(3, 1, 1)


def sample_generator(seed, epoch, index):
    """The generator of sample `index` in `epoch`: every random draw of a sample is a function of (seed, epoch,
    index) only, so a resumed run draws the same ones as an uninterrupted run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


class TwoViews(torch.utils.data.Dataset):
    """Two normalised views (query, key) of each image. The views of image i in epoch e depend on (seed, e, i)
    only, whichever worker draws them: this is what makes --resume exact."""

    def __init__(self, dataset, size, mean, std, seed, crop_min=0.2, jitter=0.4, hue=0.0, grayscale=0.0):
        self.dataset, self.size, self.seed, self.epoch = dataset, size, seed, 0
        self.view_args = (crop_min, jitter, hue, grayscale)
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        g = sample_generator(self.seed, self.epoch, i)
        image = (self.dataset[i]["image"] * 255).round().to(torch.uint8)  # RGB in [0, 1] -> uint8
        query, key = [(moco_view(image, self.size, g, *self.view_args) - self.mean) / self.std for _ in range(2)]
        return {"query": query, "key": key}  # 3 x size x size each


# =========================================================================================================
# Run boilerplate (identical in every method file): device, seeds, run directory, checkpoints, the loop
# =========================================================================================================
SCRIPT = os.path.splitext(os.path.basename(__file__))[0]


def choose_device(name):
    """'auto' picks cuda, then mps, then cpu; a device that is not there stops with one sentence."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = next(d for d in ("cuda", "mps", "cpu") if available[d]) if name == "auto" else name
    if not available[name]:
        raise SystemExit(f"error: --device {name} is not available on this machine; use --device cpu")
    return torch.device(name)


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(deterministic)  # bit-exact reruns; some GPU kernels get slower
    torch.backends.cudnn.benchmark = not deterministic


def autocast(device, amp):
    """bfloat16 autocast (needs no loss scaling); 'auto' turns it on on cpu and cuda."""
    enabled = amp == "bf16" or (amp == "auto" and device.type in ("cpu", "cuda"))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def start_stage(args, stage):
    """Create <runs-dir>/<script>/<name>/, write args_<stage>.json there and return the directory."""
    run = os.path.join(args.runs_dir, SCRIPT, args.name)
    if os.path.exists(os.path.join(run, f"checkpoint_{stage}.pt")) and not args.resume:
        raise SystemExit(f"error: {run} already holds a {stage} checkpoint; pass --resume to continue it or "
                         f"--name to start another run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, f"args_{stage}.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    return run


def log(run, stage, record):
    """Append a record to log_<stage>.jsonl and print it as the summary line."""
    with open(os.path.join(run, f"log_{stage}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


def save_checkpoint(path, **content):
    torch.save(content, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file; RNG states are numpy
    except Exception as error:
        raise SystemExit(f"error: {path} is not a readable checkpoint of {SCRIPT}.py ({type(error).__name__}); "
                         f"delete it or choose another --name")


def fit(args, stage, run, dataset, train_step, state, epochs, batch_size):
    """The loop of every stage: a seeded order per epoch, a tqdm bar, the log, an atomic checkpoint per epoch
    and exact resume. `train_step(batch) -> float loss` does one optimisation step; `state` names everything
    with a state_dict (models, optimiser, scheduler, queue). Returns False if --stop-after-steps stopped it."""
    path, epoch, step = os.path.join(run, f"checkpoint_{stage}.pt"), 0, 0
    if args.resume and os.path.exists(path):
        checkpoint = load_checkpoint(path)
        for key, obj in state.items():
            obj.load_state_dict(checkpoint["state"][key])
        epoch, step = checkpoint["epoch"], checkpoint["step"]
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        print(f"{stage}: resumed {path} at epoch {epoch}, step {step}")
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0 and epochs > 0:
        raise SystemExit(f"error: {len(dataset)} training images do not fill a batch of {batch_size}")

    def save():
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        save_checkpoint(path, state={key: obj.state_dict() for key, obj in state.items()}, epoch=epoch,
                        step=step, rng=rng, args=vars(args))

    while epoch < epochs:
        done = step - epoch * per_epoch  # steps of this epoch already taken before a resume
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        dataset.epoch = epoch  # random samples (augmented views) are a function of (seed, epoch, index)
        loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=order[done * batch_size:].tolist(),
                                             drop_last=True, num_workers=args.workers,
                                             generator=torch.Generator())  # leaves the global RNG alone
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", initial=done, total=per_epoch)
        total, start = 0.0, time.time()
        for batch in bar:
            loss = train_step(batch)
            step, total = step + 1, total + loss
            bar.set_postfix(loss=f"{loss:.4f}")
            if step == args.stop_after_steps:
                save()
                print(f"{stage}: stopped after step {step} (--stop-after-steps); continue with --resume")
                return False
        epoch, seconds = epoch + 1, time.time() - start
        log(run, stage, {"stage": stage, "epoch": epoch, "step": step, "loss": total / (per_epoch - done),
                         "lr": state["optimizer"].param_groups[0]["lr"], "seconds": round(seconds, 1),
                         "images_per_s": round((per_epoch - done) * batch_size / seconds, 1)})
        save()
    save()  # also when there was nothing to train (--epochs 0): later stages read this checkpoint
    return True


# =========================================================================================================
# Exports and pictures
# =========================================================================================================
def export(module, run, variant, info, args, groups, kind="features"):
    """Write <run>/<variant>.pt2: a frozen extractor of [0, 1] images, data.save_extractor's contract; `kind` is
    "features" (dense descriptors) or "heatmaps" (one probability map per discovered landmark)."""
    module = copy.deepcopy(module).float().cpu().eval().to(memory_format=torch.contiguous_format)
    meta = {"input_size": [args.image_size] * 2, "kind": kind, "method": SCRIPT, "variant": variant,
            "channel_groups": groups, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs}
    meta = data.save_extractor(module, os.path.join(run, f"{variant}.pt2"), meta, info.mean, info.std)
    print(f"exported {os.path.join(run, variant)}.pt2: {meta['channels']} x {meta['output_size']} {kind}")


def save_pictures(path, images, maps, title):
    """Images (n, 3, H, W) in [0, 1] above their maps (n, 3, h, w) in [0, 1], as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(images), figsize=(1.5 * len(images), 3.3), squeeze=False)
    for i, pair in enumerate(zip(images, maps)):
        for row, picture in enumerate(pair):
            axes[row, i].imshow(picture.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            axes[row, i].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def clean_images(train_set, n):
    """The first n training images, RGB in [0, 1]: (n, 3, H, W)."""
    return torch.stack([train_set[i]["image"] for i in range(min(n, len(train_set)))])


def load_backbone(run, device):
    """The MoCo query encoder from this run's checkpoint_pretrain.pt, frozen and in eval mode, with the batch-norm
    statistics the pretraining stage exported it with (the clean-image ones of --bn-stats-images, if set)."""
    path = os.path.join(run, "checkpoint_pretrain.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no pretrained backbone at {path}; run --stage pretrain with this --name first")
    checkpoint = load_checkpoint(path)
    model = build_resnet(checkpoint["args"]["arch"], checkpoint["args"]["moco_dim"])
    model.load_state_dict({**checkpoint["state"]["model"], **checkpoint.get("bn_stats", {})})
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# =========================================================================================================
# Main: seed, device, data, then the stages (model and optimiser, resume, loop, save, export)
# =========================================================================================================
def main(argv=None):
    args = get_args(argv)
    device = choose_device(args.device)
    try:  # RGB in [0, 1]: the views are made before normalising
        info = data.make_dataset(args.dataset, "train", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError as error:
        raise SystemExit(f"error: {error}")
    train_set = torch.utils.data.Subset(info, range(min(args.train_images or len(info), len(info))))
    normalize = data.Normalize(info.mean, info.std).to(device)
    figure_images = clean_images(train_set, 8)  # 8 x 3 x H x W
    grid = args.image_size // 2  # the exports' hypercolumn grid: 48x48 at 96 px, as in the official code
    stages = ["pretrain", "project", "nmf"] if args.stage == "all" else [args.stage]

    if "pretrain" in stages:  # ---- MoCo, Eq. 5 ---------------------------------------------------------------
        run = start_stage(args, "pretrain")
        seed_everything(args.seed, args.deterministic)
        model = build_resnet(args.arch, args.moco_dim, args.imagenet_init)
        model = model.to(device, memory_format=torch.channels_last).train()  # channels_last: faster on CPU
        key_model = copy.deepcopy(model).requires_grad_(False)  # starts equal, then follows by momentum only
        queue = KeyQueue(args.moco_queue, args.moco_dim).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        steps = args.epochs * (len(train_set) // args.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))

        def moco_step(batch):
            view_q, view_k = batch["query"].to(device), batch["key"].to(device)  # N x 3 x S x S each
            with autocast(device, args.amp):
                q = F.normalize(encode_in_splits(model, view_q, args.moco_bn_splits).float(), dim=1)  # N x dim
                with torch.no_grad():
                    momentum_update(key_model, model, args.moco_momentum)
                    order = torch.randperm(len(view_k)).to(device)  # key sub-batches differ from the queries'
                    k = F.normalize(encode_in_splits(key_model, view_k, args.moco_bn_splits, order).float(), dim=1)
            loss = info_nce(q, k, queue.keys, args.moco_tau)  # Eq. 5
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            queue.push(k)  # the newest keys replace the oldest negatives
            return loss.item()

        views = TwoViews(train_set, args.image_size, info.mean, info.std, args.seed, args.moco_crop_min,
                         args.moco_jitter, args.moco_hue, args.moco_grayscale)
        state = {"model": model, "key_model": key_model, "queue": queue, "optimizer": optimizer,
                 "scheduler": scheduler}
        if not fit(args, "pretrain", run, views, moco_step, state, args.epochs, args.batch_size):
            return
        model.eval()
        if args.bn_stats_images:  # the exports then carry the statistics of clean images, not of the views
            measure_bn_stats(model, normalize(clean_images(train_set, args.bn_stats_images).to(device)),
                             args.batch_size)  # kept beside the training state, which resume still needs as it was
            path = os.path.join(run, "checkpoint_pretrain.pt")
            stats = {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
            save_checkpoint(path, **{**load_checkpoint(path), "bn_stats": stats})
        for layers in [args.layers] + ([[name] for name in args.layers] if len(args.layers) > 1 else []):
            hyper = Hypercolumn(model, layers, grid)  # the hypercolumn, then each layer alone (Tab. 3)
            export(hyper, run, "hypercol" if layers == args.layers else layers[0], info, args, hyper.groups)
        hyper = Hypercolumn(model, args.layers, grid)
        with torch.no_grad():  # supplement Fig. 1: the first 3 principal components of the hypercolumn as RGB
            h = hyper(normalize(figure_images.to(device))).float()  # 8 x C x 48 x 48
            flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (8 48 48) x C
            rgb = (flat - flat.mean(0)) @ torch.pca_lowrank(flat, q=3)[2]  # (8 48 48) x 3
            rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values + 1e-8)
        save_pictures(os.path.join(run, "pca.png"), figure_images, rgb.view(len(h), grid, grid, 3)
                      .permute(0, 3, 1, 2), f"hypercolumn PCA, {args.arch}, {args.epochs} epochs")

    if "project" in stages:  # ---- spatial-contrastive projector, Eq. 3-4 ---------------------------------------
        run = start_stage(args, "project")
        seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(run, device)
        hyper = Hypercolumn(backbone, args.layers, args.image_size // 4)  # 24x24 at 96 px
        projector = Projector(sum(hyper.widths), args.proj_dim, args.proj_softmax).to(device)
        optimizer = torch.optim.Adam(projector.parameters(), lr=args.proj_lr, weight_decay=5e-4)

        def projector_step(batch):  # un-augmented images, x' = x
            with torch.no_grad(), autocast(device, args.amp):
                h = hyper(normalize(batch["image"].to(device))).float()  # B x C x 24 x 24, frozen
            loss = spatial_contrastive_loss(projector(h), stride=args.image_size / hyper.size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        state = {"projector": projector, "optimizer": optimizer}
        if not fit(args, "project", run, train_set, projector_step, state, args.proj_epochs, args.batch_size):
            return
        export(nn.Sequential(Hypercolumn(backbone, args.layers, grid), projector), run, "proj", info, args,
               [["proj", 0, args.proj_dim]])

    if "nmf" in stages:  # ---- NMF baseline, Tab. 4 and Fig. 5 (deterministic and quick: no resume) --------------
        run = start_stage(args, "nmf")
        seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(run, device)
        hyper = Hypercolumn(backbone, args.layers, args.image_size // 4)
        images = clean_images(train_set, args.nmf_images)
        with torch.no_grad(), autocast(device, args.amp):
            v = torch.cat([hyper(normalize(x.to(device))).float() for x in images.split(args.batch_size)])
        V = v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])  # (n 24 24) x C, >= 0 after ReLU and resizing
        torch.set_flush_denormal(True)  # the updates shrink unused basis entries into denormals: 2x slower on CPU
        start = time.time()
        W, basis = nmf(V, args.nmf_k, args.nmf_iters, generator=torch.Generator().manual_seed(args.seed))
        log(run, "nmf", {"stage": "nmf", "images": len(images), "k": args.nmf_k, "seconds": round(time.time() -
            start, 1), "relative_error": round(((V - W @ basis).norm() / V.norm()).item(), 4)})
        save_checkpoint(os.path.join(run, "checkpoint_nmf.pt"), state={"basis": basis.cpu()}, args=vars(args))
        extractor = nn.Sequential(Hypercolumn(backbone, args.layers, grid), NMFCoefficients(basis, args.nmf_iters // 4))
        export(extractor, run, "nmf", info, args, [["nmf", 0, args.nmf_k]])
        with torch.no_grad():  # Fig. 5: each location coloured by its strongest NMF component
            parts = extractor(normalize(figure_images.to(device))).argmax(1).cpu()  # 8 x 48 x 48
        palette = torch.rand(args.nmf_k, 3, generator=torch.Generator().manual_seed(0))  # a colour per part
        small = F.interpolate(figure_images, size=(grid, grid), mode="bilinear", antialias=True)
        save_pictures(os.path.join(run, "nmf_parts.png"), figure_images, 0.4 * small + 0.6 *
                      palette[parts].permute(0, 3, 1, 2), f"NMF parts, k = {args.nmf_k}, strongest per location")


if __name__ == "__main__":
    main()
