"""Speed of moco_hypercol.py's pretraining step, ResNet-18 at 96x96: end to end and the model alone.

    python tests/bench_moco_hypercol.py [--batch-size 32] [--steps 20] [--amp auto|bf16|none] [--workers 1]

Prints `name: value unit` lines:
  pretrain_end_to_end   images/s of a real run of the script (rendering, the two augmented views, the MoCo
                        step), from its log, first epoch of --steps steps (includes warm-up);
  pretrain_model_step   images/s of the MoCo step alone on fixed views (both encoders, loss, backward, SGD,
                        momentum update, queue), median over --steps after 3 warm-up steps;
  views_per_image       milliseconds to render one image and draw its two views, in one process.
If the end-to-end figure is close to the model step, data loading is not the bottleneck.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import moco_hypercol as mh  # noqa: E402


def model_step_speed(args):
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = mh.build_resnet("resnet18", 128).to(memory_format=torch.channels_last).train()
    key_model = mh.build_resnet("resnet18", 128).to(memory_format=torch.channels_last).train()
    queue = mh.KeyQueue(4096, 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    view_q, view_k = torch.randn(2, args.batch_size, 3, 96, 96)
    times = []
    for _ in range(args.steps + 3):  # the same computation as moco_step in moco_hypercol.main
        start = time.perf_counter()
        with mh.autocast(device, args.amp):
            q = F.normalize(mh.encode_in_splits(model, view_q, 2).float(), dim=1)
            with torch.no_grad():
                mh.momentum_update(key_model, model, 0.99)
                k = F.normalize(mh.encode_in_splits(key_model, view_k, 2, torch.randperm(len(view_k))).float(), dim=1)
        loss = mh.info_nce(q, k, queue.keys, 0.07)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        queue.push(k)
        times.append(time.perf_counter() - start)
    return args.batch_size / sorted(times[3:])[len(times[3:]) // 2]


def end_to_end_speed(args):
    with tempfile.TemporaryDirectory() as root:
        mh.main(["--runs-dir", root, "--stage", "pretrain", "--epochs", "1", "--batch-size", str(args.batch_size),
                 "--train-images", str(args.batch_size * args.steps), "--amp", args.amp, "--workers",
                 str(args.workers)])
        with open(os.path.join(root, "moco_hypercol", "default", "log_pretrain.jsonl")) as f:
            return json.loads(f.readline())["images_per_s"]


def views_time():
    dataset = data.make_dataset("synth-faces", "train", normalize=False)
    views = mh.TwoViews(dataset, 96, dataset.mean, dataset.std, seed=0)
    views[0]
    start = time.perf_counter()
    for i in range(1, 65):
        views[i]
    return (time.perf_counter() - start) / 64 * 1000


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"views_per_image: {views_time():.2f} ms (1 thread)")
    torch.set_num_threads(os.cpu_count())
    print(f"pretrain_model_step: {model_step_speed(args):.1f} images/s (amp {args.amp}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads)")
    print(f"pretrain_end_to_end: {end_to_end_speed(args):.1f} images/s (amp {args.amp}, {args.workers} workers)",
          flush=True)
