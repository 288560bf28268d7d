"""Speed and memory of moco_hypercol.py's pretraining, ResNet-18 at 96x96 unless said otherwise.

    python tests/bench_moco_hypercol.py [--batch-size 32] [--steps 10] [--end-to-end] [--memory]

Prints `name: value unit` lines:
  views_old / views_new       images/s of one process drawing both views of an image: the old per-image path
                              (JPEG noise, crop, jitter, lighting with torchvision's functional ops, all in a
                              worker; a copy of it is kept below) against the new one (the worker's JPEG noise,
                              plus the device's batched share, measured on this CPU); also with the rendering
  host_syncs_per_step         calls that would make the host wait for a GPU in one training step (views drawn)
  pretrain_model_step_*       images/s of the MoCo step alone on fixed views (both encoders, loss, backward, SGD,
                              momentum update, queue) in fp32 and bf16, median of --steps after 2 warm-up steps,
                              the old step (a copy below) and the new one timed alternately in the same run
  pretrain_end_to_end         (--end-to-end) images/s of a real run of the script, from its log
  peak_memory_gb              (--memory) max resident memory of one pretraining step of the README's paper-scale
                              command (--arch resnet50 --batch-size 256), from subprocesses at 3 small batch
                              sizes and a straight line through them, and the same for a projector step
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import moco_hypercol as mh  # noqa: E402
from conftest import HostSyncs  # noqa: E402


def old_moco_view(image, size, g, crop_min=0.2, jitter=0.4, hue=0.0, grayscale=0.0):
    """The per-image view of moco_hypercol.py before the views moved to the device (commit 7f76ad3)."""
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    _, height, width = image.shape
    side = max(int(0.8 * width), int(width * (1 + 0.5 * torch.randn((), generator=g).item())))
    buffer = io.BytesIO()
    TF.to_pil_image(image).resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=int(uniform(30, 99)))
    image = TF.pil_to_tensor(Image.open(buffer).resize((width, height), Image.BILINEAR))
    box = (0, 0, height, width)
    for _ in range(10):
        area, ratio = height * width * uniform(crop_min, 1), np.exp(uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if w <= width and h <= height:
            box = (int(uniform(0, height - h + 1)), int(uniform(0, width - w + 1)), h, w)
            break
    image = TF.resized_crop(image, *box, [size, size], antialias=True).float() / 255
    adjustments = [(TF.adjust_brightness, 1 - jitter, 1 + jitter), (TF.adjust_contrast, 1 - jitter, 1 + jitter),
                   (TF.adjust_saturation, 1 - jitter, 1 + jitter), (TF.adjust_hue, -hue, hue)][:4 if hue else 3]
    for i in torch.randperm(len(adjustments), generator=g).tolist():
        adjust, low, high = adjustments[i]
        image = adjust(image, uniform(low, high))
    if uniform(0, 1) < grayscale:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    alpha = torch.randn(3, generator=g) * 0.1
    return image + (mh.PCA_EIGVEC @ (alpha * mh.PCA_EIGVAL)).view(3, 1, 1)


def old_step(state, view_q, view_k, args, dtype):
    """The MoCo step before this version: a Python loop for the momentum update, the key order from the global
    generator, the loss read every step."""
    model, key_model, queue = state["model"], state["key_model"], state["queue"]
    with data.autocast(view_q.device, dtype):
        q = F.normalize(mh.encode_in_splits(model, view_q, 2).float(), dim=1)
        with torch.no_grad():
            for p_k, p_q in zip(key_model.parameters(), model.parameters()):
                p_k.mul_(args.moco_momentum).add_(p_q.detach(), alpha=1 - args.moco_momentum)
            k = F.normalize(mh.encode_in_splits(key_model, view_k, 2, torch.randperm(len(view_k))).float(), dim=1)
    loss = mh.info_nce(q, k, queue.keys, args.moco_tau)
    state["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    state["optimizer"].step()
    state["scheduler"].step()
    queue.push(k)
    return loss.item()


def pretrain_state(arch="resnet18"):
    """What main builds for the pretraining stage, on the CPU."""
    torch.manual_seed(0)
    model = mh.build_resnet(arch, 128).to(memory_format=torch.channels_last).train()
    key_model = mh.build_resnet(arch, 128).to(memory_format=torch.channels_last).train().requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    return {"model": model, "key_model": key_model, "queue": mh.KeyQueue(4096, 128), "optimizer": optimizer,
            "scaler": data.grad_scaler(torch.device("cpu"), None),
            "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)}


def views_speed(batch_size):
    """images/s (both views of each) per process, 1 thread: old path, new worker share + new device share."""
    torch.set_num_threads(1)
    dataset = data.make_dataset("synth-faces", "train", normalize=False)
    rendered = [(dataset[i]["image"] * 255).round().to(torch.uint8) for i in range(batch_size)]
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    normalize = data.Normalize(dataset.mean, dataset.std)

    def old():  # per image, in a worker: both views
        g = torch.Generator().manual_seed(0)
        for image in rendered:
            [(old_moco_view(image, 96, g) - mean) / std for _ in range(2)]

    def new_worker():
        g = torch.Generator().manual_seed(0)
        for image in rendered:
            mh.jpeg_noise(image, g), mh.jpeg_noise(image, g)

    batch = torch.stack(rendered + rendered)  # 2N: both views

    def new_device():
        g = torch.Generator().manual_seed(0)
        normalize(mh.moco_views(batch, mh.view_params(len(batch), 96, 96, g)))

    def render():
        for i in range(batch_size):
            dataset[i]

    paths = {"old": old, "worker": new_worker, "device": new_device, "render": render}
    timings = {name: float("inf") for name in paths}
    for _ in range(6):  # interleaved rounds, the best of each: the least disturbed by other processes
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            timings[name] = min(timings[name], time.perf_counter() - start)
    rate = lambda seconds: batch_size / seconds  # noqa: E731
    old_s, new_s = timings["old"], timings["worker"] + timings["device"]
    print(f"views_old: {rate(old_s):.0f} images/s (both views, per process, 1 thread)")
    print(f"views_new: {rate(new_s):.0f} images/s (worker {rate(timings['worker']):.0f}, device share on this "
          f"CPU {rate(timings['device']):.0f})")
    print(f"views_speedup: {old_s / new_s:.1f} x")
    render_s = timings["render"]
    print(f"views_with_rendering_old: {rate(old_s + render_s):.0f} images/s")
    print(f"views_with_rendering_new: {rate(new_s + render_s):.0f} images/s (speedup "
          f"{(old_s + render_s) / (new_s + render_s):.1f} x)")


def host_syncs_per_step(batch_size):
    args = mh.get_args(["--batch-size", str(batch_size)])
    state, counter = pretrain_state(), HostSyncs()
    images = torch.randint(0, 256, (2 * batch_size, 3, 96, 96), dtype=torch.uint8)
    normalize, g = data.Normalize(data.FACE_MEAN, data.FACE_STD), data.generator(0, 0)
    with counter:
        views = normalize(mh.moco_views(images, mh.view_params(len(images), 96, 96, g)))
        mh.moco_step(state, *views.chunk(2), g, args, torch.bfloat16)
    print(f"host_syncs_per_step: {len(counter.calls)} calls {counter.calls} (views, both encoders, Eq. 5, SGD, "
          f"momentum update, queue; the loss is read every --log-every steps)")


def model_step_speed(batch_size, steps):
    """The old and the new step alternately on the same fixed views, fp32 then bf16."""
    torch.set_num_threads(os.cpu_count())
    args = mh.get_args(["--batch-size", str(batch_size)])
    view_q, view_k = torch.randn(2, batch_size, 3, 96, 96)
    for dtype, name in ((None, "fp32"), (torch.bfloat16, "bf16")):
        states, times = {"old": pretrain_state(), "new": pretrain_state()}, {"old": [], "new": []}
        for step in range(steps + 2):
            for which in ("old", "new"):
                start = time.perf_counter()
                if which == "old":
                    old_step(states["old"], view_q, view_k, args, dtype)
                else:
                    mh.moco_step(states["new"], view_q, view_k, data.generator(0, step), args, dtype).item()
                times[which].append(time.perf_counter() - start)
        rates = {k: batch_size / float(np.median(v[2:])) for k, v in times.items()}
        print(f"pretrain_model_step_{name}: {rates['new']:.1f} images/s (old step in the same run "
              f"{rates['old']:.1f}; batch {batch_size}, {torch.get_num_threads()} threads)", flush=True)


def end_to_end_speed(batch_size, steps, amp, workers):
    with tempfile.TemporaryDirectory() as root:
        mh.main(["--runs-dir", root, "--stage", "pretrain", "--epochs", "1", "--batch-size", str(batch_size),
                 "--train-images", str(batch_size * steps), "--amp", amp, "--workers", str(workers)])
        with open(os.path.join(root, "moco_hypercol", "default", "log_pretrain.jsonl")) as f:
            speed = json.loads(f.readline())["images_per_s"]
    print(f"pretrain_end_to_end: {speed:.1f} images/s (amp {amp}, {workers} workers)")


MEMORY_CHILD = """
import resource, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import data, moco_hypercol as mh, bench_moco_hypercol as bench
stage, batch, amp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
dtype = data.amp_dtype(torch.device("cpu"), amp)
state = bench.pretrain_state("resnet50")
if stage == "pretrain":  # two steps: the optimiser's momentum buffers exist from the second on
    args = mh.get_args(["--batch-size", str(batch), "--arch", "resnet50"])
    images = torch.randint(0, 256, (2 * batch, 3, 96, 96), dtype=torch.uint8)
    for step in range(2):
        g = data.generator(0, step)
        views = mh.moco_views(images, mh.view_params(len(images), 96, 96, g))
        mh.moco_step(state, *views.chunk(2), g, args, dtype)
else:  # the projector on the frozen 3840-d hypercolumn at 24x24
    hyper = mh.Hypercolumn(state["model"].eval().requires_grad_(False), ["layer4", "layer3", "layer2", "layer1"], 24)
    projector = mh.Projector(3840, 64, False)
    optimizer = torch.optim.Adam(projector.parameters(), lr=1e-3)
    for step in range(2):
        with torch.no_grad(), data.autocast(torch.device("cpu"), dtype):
            h = hyper(torch.randn(batch, 3, 96, 96)).float()
        mh.spatial_contrastive_loss(projector(h), stride=4).backward()
        optimizer.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # kB -> GB
"""


def peak_memory(amp, sizes=(4, 8, 16), target=256):
    here = os.path.dirname(os.path.abspath(__file__))
    code = MEMORY_CHILD.format(root=os.path.dirname(here), tests=here)
    for stage in ("pretrain", "project"):
        gb = [float(subprocess.run([sys.executable, "-c", code, stage, str(b), amp], capture_output=True, text=True,
                                   check=True).stdout.split()[-1]) for b in sizes]
        slope, intercept = np.polyfit(sizes, gb, 1)
        print(f"peak_memory_gb: {intercept + slope * target:.1f} GB ({stage}, resnet50, batch {target}, amp {amp}; "
              f"measured {', '.join(f'{g:.2f}' for g in gb)} GB at batch {', '.join(map(str, sizes))}: "
              f"{intercept:.2f} GB + {slope * 1024:.1f} MB per image)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--end-to-end", action="store_true", help="also time a real run of the script (slow)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="for --end-to-end")
    parser.add_argument("--workers", type=int, default=1, help="for --end-to-end")
    parser.add_argument("--memory", action="store_true", help="only the peak-memory lines (ResNet-50 subprocesses)")
    args = parser.parse_args()
    if args.memory:
        for amp in ("none", "bf16"):
            peak_memory(amp)
        sys.exit()
    views_speed(args.batch_size)
    host_syncs_per_step(args.batch_size)
    model_step_speed(args.batch_size, args.steps)
    if args.end_to_end:
        end_to_end_speed(args.batch_size, args.steps, args.amp, args.workers)
