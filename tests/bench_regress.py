"""Benchmark of regress.py's feature cache: one training epoch on cached float16 features versus streamed
features (render the synthetic faces, run the frozen extractor, then the head, every epoch).

Run: ``python tests/bench_regress.py`` (a few minutes on a busy 2-core CPU). Prints ``name: value unit`` lines:
cache_build (one pass of the extractor over the training images, paid once), then for DVE's landmark regressor
and for the mask head (--task mask) the seconds per epoch cached and streamed, and the speed-up. The extractor
is a small random conv net giving 64 channels at 48x48 (the protocol's map size). DVE's head is itself costly
(nA x 50 softmax maps of 48x48 per image), so caching saves the extractor's share only: small with this tiny
net, larger with a real backbone, and largest for cheap heads (mask, ridge). One intra-op thread, so that the
numbers are stable on a shared machine; ``--threads N`` changes it.

Convergence and scale (docs/evaluation.md): ``python tests/bench_regress.py --features X.pt2 --epochs 10 20
[--scale]`` caches X's features of 500 training, 200 validation and 500 test synthetic faces once, then trains
DVE's head with regress.py's default protocol for each number of epochs (the same seed, so the runs differ only in
length) and prints the test IOD of each beside the mean training shape's. ``--scale`` also runs them on the features
with every channel multiplied by its own constant in 0.1-10 (log-uniform, seed 1).
"""
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import regress  # noqa: E402

TRAIN_IMAGES, EVAL_IMAGES, BATCH, EPOCHS = 256, 32, 32, 2


def small_extractor(path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    meta = dict(input_size=[96, 96], kind="features", method="bench", variant="small")
    data.save_extractor(net, path, meta, data.FACE_MEAN, data.FACE_STD)
    return data.load_extractor(path)


def source(extractor, split, n, cached, with_mask):
    dataset = data.make_dataset("synth-faces", split, normalize=False, length=n)
    source = dict(dataset=dataset, indices=list(range(n)), store=None, extractor=extractor, workers=0)
    return dict(source, store=regress.cache_features(source, BATCH, with_mask, "cpu") if cached else None)


def seconds_per_epoch(task, train, val, test):
    spec = dict(task=task, size=(96, 96), metric="iou" if task == "mask" else "iod", eye_indices=(0, 1),
                pck_int_truncation=False)
    torch.manual_seed(0)
    head = regress.MaskHead(64, (96, 96)) if task == "mask" else regress.DVERegressor(64, 5)
    start = time.time()
    regress.fit(head, spec, train, val, test, "dve", 1e-3, 5e-4, EPOCHS, BATCH, "val", False, "cpu", seed=0)
    return (time.time() - start) / EPOCHS


def convergence(path, epochs, scale):
    spec = dict(task="landmarks", size=(96, 96), metric="iod", eye_indices=(0, 1), pck_int_truncation=False)
    extractor = data.load_extractor(path)
    sources = {}
    for split, n in (("train", 500), ("val", 200), ("test", 500)):
        src = source(extractor, split, n, False, False)
        sources[split] = dict(src, store=regress.cache_features(src, BATCH, False, "cpu", f"cache {split}"))
    reference = regress.mean_shape_reference(*[regress.split_keypoints(sources[s]) for s in ("train", "test")], spec)
    print(f"mean_shape_iod: {reference['iod']:.3f} %")
    for scaled in (False, True) if scale else (False,):
        if scaled:
            c = 10 ** (torch.rand(extractor.meta["channels"], generator=torch.Generator().manual_seed(1)) * 2 - 1)
            for src in sources.values():
                src["store"]["features"] = (src["store"]["features"].float() * c.view(1, -1, 1, 1)).half()
        for n in epochs:
            args = regress.parse_args(["--features", path, "--epochs", str(n)])
            torch.manual_seed(0)
            head = regress.make_head(args, extractor.meta["channels"], 5, (96, 96), sources["train"], "cpu")
            start = time.time()
            result = regress.fit(head, spec, sources["train"], sources["val"], sources["test"], args.protocol, args.lr,
                                 args.weight_decay, n, args.batch_size, args.select_on, False, "cpu", 0,
                                 amp=data.amp_dtype(torch.device("cpu"), args.amp))
            tag = "_scaled" * scaled
            print(f"test_iod_epochs{n}{tag}: {result['test']['iod']:.3f} % (epoch {result['selected_epoch']}, "
                  f"{time.time() - start:.0f} s)")


def main():
    if "--features" in sys.argv:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        epochs = [int(a) for a in sys.argv[sys.argv.index("--epochs") + 1:] if a.isdigit()]
        return convergence(sys.argv[sys.argv.index("--features") + 1], epochs, "--scale" in sys.argv)
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as regress.py does: DVE's sharp softmax underflows to slow denormal floats
    print(f"threads: {threads} threads")
    print(f"train_images: {TRAIN_IMAGES} images")
    with tempfile.TemporaryDirectory() as tmp:
        extractor = small_extractor(os.path.join(tmp, "small.pt2"))
        for task in ("landmarks", "mask"):
            with_mask = task == "mask"
            val, test = (source(extractor, s, EVAL_IMAGES, True, with_mask) for s in ("val", "test"))
            start = time.time()
            cached = source(extractor, "train", TRAIN_IMAGES, True, with_mask)
            if task == "landmarks":
                print(f"cache_build: {time.time() - start:.2f} s")
            streamed = source(extractor, "train", TRAIN_IMAGES, False, with_mask)
            t_cached = seconds_per_epoch(task, cached, val, test)
            t_streamed = seconds_per_epoch(task, streamed, val, test)
            name = "regress" if task == "landmarks" else "mask"
            print(f"{name}_epoch_cached: {t_cached:.2f} s")
            print(f"{name}_epoch_streamed: {t_streamed:.2f} s")
            print(f"{name}_cache_speedup: {t_streamed / t_cached:.2f} x")


if __name__ == "__main__":
    main()
