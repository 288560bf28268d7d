"""Speed of equiv_pretrain.py's training steps at 96x96: end to end and the model alone, for each stage.

    python tests/bench_equiv_pretrain.py [--batch-size 16] [--steps 10] [--amp auto|bf16|none] [--workers 1]

Prints `name: value unit` lines (images/s counts the B images of a batch, not their B warped copies):
  stage1_model_step    the Eq. 7 step alone on fixed images: warp g, appearance r, K points and their images,
                       the hourglass on x and x', loss, backward, Adam; median over --steps after 2 warm-up steps;
  stage2_model_step    the detector step on frozen F (warp, F forward without gradients, T, the three losses);
  end2end_model_step   the same with F trained too (the baseline);
  <stage>_end_to_end   a real run of the script (rendering included), from its log: the first epoch of --steps
                       steps (warm-up included).
If an end-to-end figure is close to its model step, data loading is not the bottleneck.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import equiv_pretrain as ep  # noqa: E402


def model_step_speed(args, stage):
    """The computation of stage1_step / detector_step in equiv_pretrain.main, on fixed images."""
    torch.manual_seed(0)
    device, opts = torch.device("cpu"), ep.get_args([])
    normalize = data.Normalize(data.FACE_MEAN, data.FACE_STD)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    features = ep.Hourglass().to(memory_format=torch.channels_last).train(stage != "stage2")
    detector = ep.Detector(64, 10, 32).to(memory_format=torch.channels_last)
    params = list(features.parameters()) if stage == "stage1" else list(detector.parameters()) + (
        list(features.parameters()) if stage == "end2end" else [])
    optimizer = torch.optim.Adam(params, lr=3e-4, weight_decay=5e-4)
    x = torch.rand(args.batch_size, 3, 96, 96)
    times = []
    for _ in range(args.steps + 2):
        start = time.perf_counter()
        if stage == "stage1":
            warp = ep.random_warp(len(x), opts, device, zoom_and_shift=True)
            x_prime = ep.appearance(data.warp_images(x, warp), 0.3, 0.04)
            lam = 2 * torch.rand(len(x), 64, 2) - 1
            lam_prime = warp.forward(lam)
            keep = (lam_prime.abs() <= 1).all(-1)
            with ep.autocast(device, args.amp):
                f, f_prime = features(cl(normalize(torch.cat([x, x_prime])))).float().chunk(2)
            loss = ep.equivariant_contrastive_loss(ep.sample_features(f, lam)[keep],
                                                   ep.sample_features(f_prime, lam_prime.nan_to_num())[keep], 0.1)
        else:
            warp = ep.random_warp(len(x), opts, device, zoom_and_shift=False)
            with ep.autocast(device, args.amp), torch.set_grad_enabled(stage == "end2end"):
                f = features(cl(normalize(torch.cat([x, data.warp_images(x, warp)]))))
            with ep.autocast(device, args.amp):
                heatmaps = ep.SpatialSoftmax()(detector(f))
            h, h_prime = heatmaps.chunk(2)
            loss = ep.equivariance_loss(ep.soft_argmax(h), ep.soft_argmax(h_prime), warp) + \
                ep.diversity_loss(heatmaps, 6) + 0.1 * ep.variance_loss(heatmaps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return args.batch_size / sorted(times[2:])[len(times[2:]) // 2]


def end_to_end_speed(args, stage):
    with tempfile.TemporaryDirectory() as root:
        flags = ["--runs-dir", root, "--batch-size", str(args.batch_size), "--train-images",
                 str(args.batch_size * args.steps), "--amp", args.amp, "--workers", str(args.workers), "--epochs", "1",
                 "--equiv-det-epochs", "1"]
        # stage 2 needs stage 1 first; the baseline trains --epochs + --equiv-det-epochs = 1 epoch
        flags += {"stage1": ["--stage", "1"], "stage2": [],
                  "end2end": ["--end-to-end", "--equiv-det-epochs", "0"]}[stage]
        ep.main(flags)
        with open(os.path.join(root, "equiv_pretrain", "default", f"log_{stage}.jsonl")) as f:
            return [json.loads(line) for line in f if '"epoch"' in line][0]["images_per_s"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    for stage in ("stage1", "stage2", "end2end"):
        print(f"{stage}_model_step: {model_step_speed(args, stage):.1f} images/s (amp {args.amp}, batch "
              f"{args.batch_size}, {threads} threads)", flush=True)
    for stage in ("stage1", "stage2", "end2end"):
        print(f"{stage}_end_to_end: {end_to_end_speed(args, stage):.1f} images/s (amp {args.amp}, {args.workers} "
              f"workers, {threads} threads)", flush=True)
