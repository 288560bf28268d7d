"""Data and geometry shared by every script of landmark-ssl.

The method files (moco_hypercol.py, byol_lead.py, equiv_pretrain.py) and the evaluation (regress.py, match.py)
all import this one module. Its sections, in reading order:

1. constants of every dataset, and the error a user can cause;
2. built-in synthetic landmark data (faces like MAFL and 300W, birds like CUB), drawn on the fly;
3. real datasets, read from the layouts their users have on disk;
4. warps (thin-plate spline, affine, elastic) that move images and points together, exactly;
5. datasets by name, for every script's --dataset flag;
6. the exported feature-extractor contract: how a method hands its frozen features to the evaluation;
7. what the method files share: the NMF baseline, the run helpers, the uint8 dataset and the pictures;
8. the command line: `python data.py preview --dataset synth-faces-wild --out preview.png` draws samples.

Every dataset follows the sample format of docs/protocol.md (section 1): ``dataset[i]`` is a dict with image
(3, H, W), keypoints (K, 2) in pixels (centres at integers), visible (K,), identity, index, and, where
``dataset.has_mask``, the exact foreground mask; docs/protocol.md also states the evaluation protocol and layouts.
"""
import argparse
import csv
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset
import torchvision
import torchvision.transforms.functional as TF

# =========================================================================================================
# 1. Constants of every dataset, and the error a user can cause
# =========================================================================================================
FACE_MEAN = (0.5084, 0.4224, 0.3769)  # DVE's statistics of aligned CelebA, for every face dataset
FACE_STD = (0.2599, 0.2371, 0.2323)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # birds (CUB) and other images
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A dataset is missing, laid out differently than expected, or malformed (a user error)."""


# =========================================================================================================
# 2. Built-in synthetic landmark data: faces (standing in for MAFL and 300-W) and perched birds (for CUB),
# drawn from numbers alone, so that every script runs, and is tested, with no download. A sample depends only
# on (seed, split, index), at any size S; docs/protocol.md says what its landmarks and visibility mean.
# Step one, params(index): identity numbers (shapes, colours, hair, plumage) come from (seed, identity) alone,
# so the poses_per_identity consecutive indices of an identity, and the face variants, show the same people;
# pose numbers and a scene seed come from (seed, variant, split, index). Splits have disjoint identities.
# Step two, render(params): labelled polygons in painter's order in the object's own coordinates, each landmark
# named where its part is made, then one transform for all, so the landmarks are exact. PIL fills the polygons
# into a label map; the image is coloured from it (noise textures, light) and the mask is its foreground.
# =========================================================================================================
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS = {"train": 10000, "val": 1000, "test": 1000}
IDENTITY_BLOCK = 10 ** 8  # identity ids of split s lie in [s * IDENTITY_BLOCK, (s + 1) * IDENTITY_BLOCK)
CLUTTER = 8  # label ids 1..CLUTTER are background shapes

MAFL_NAMES = ["left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner"]
DENSE_FACE_NAMES = (
    [f"jaw {k}" for k in range(1, 10)]  # from the image-left ear level round the chin to the image-right
    + ["left brow outer", "left brow middle", "left brow inner", "right brow inner", "right brow middle",
       "right brow outer", "nose bridge", "nose tip", "left nostril wing", "right nostril wing",
       "left eye outer corner", "left eye upper lid", "left eye inner corner", "left eye lower lid",
       "right eye inner corner", "right eye upper lid", "right eye outer corner", "right eye lower lid",
       "left mouth corner", "upper lip top", "right mouth corner", "lower lip bottom", "upper lip inner",
       "lower lip inner"])
CUB_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
             "nape", "right eye", "right leg", "right wing", "tail", "throat"]
FACE_LABELS = ["background"] + ["clutter"] * CLUTTER + [
    "shirt", "neck", "ear", "skin", "brow", "hair", "nose", "nose tip", "sclera", "iris", "pupil",
    "lips", "mouth", "teeth", "glasses", "occluder"]
BIRD_LABELS = ["background"] + ["clutter"] * CLUTTER + [
    "perch", "left leg", "right leg", "body", "belly", "breast", "head", "cap",
    "left eye", "right eye", "beak", "left wing", "right wing", "tail"]
FACE = {name: i for i, name in enumerate(FACE_LABELS)}
BIRD = {name: i for i, name in enumerate(BIRD_LABELS)}
BIRD_PART = {"belly": "body", "breast": "body", "cap": "head"}  # the part a patch of colour lies on

# Palettes (RGB in [0, 1]) that colour parameters index into.
HAIR = np.array([[0.07, 0.06, 0.05], [0.24, 0.15, 0.08], [0.45, 0.30, 0.16], [0.86, 0.71, 0.42],
                 [0.62, 0.26, 0.10], [0.68, 0.68, 0.68]])
EYES = np.array([[0.33, 0.19, 0.09], [0.45, 0.35, 0.15], [0.28, 0.46, 0.26], [0.28, 0.46, 0.72],
                 [0.50, 0.55, 0.60]])
PLUMAGE = np.array([[0.45, 0.32, 0.20], [0.50, 0.50, 0.50], [0.45, 0.45, 0.25], [0.12, 0.12, 0.12],
                    [0.78, 0.16, 0.12], [0.20, 0.36, 0.72], [0.92, 0.78, 0.18], [0.66, 0.36, 0.15],
                    [0.92, 0.92, 0.90], [0.86, 0.76, 0.56]])
BEAKS = np.array([[0.15, 0.14, 0.13], [0.85, 0.70, 0.20], [0.90, 0.45, 0.15], [0.75, 0.65, 0.55]])
LEGS = np.array([[0.2, 0.18, 0.16], [0.75, 0.55, 0.50], [0.80, 0.50, 0.20]])


def _per_label(labels, values):
    """One number per label id, from {label name: number} (0 for the labels not named)."""
    return np.array([values.get(name, 0.0) for name in labels], np.float32)


# Each label's share of the two noise textures (grain, streaks), the shading of skin, and the foreground.
FACE_GRAIN = _per_label(FACE_LABELS, dict.fromkeys(["skin", "ear", "neck", "nose", "nose tip"], 0.03)
                        | {"shirt": 0.08, "occluder": 0.08})
FACE_STREAKS = _per_label(FACE_LABELS, {"hair": 0.25, "brow": 0.25})
FACE_SHADED = _per_label(FACE_LABELS, dict.fromkeys(["skin", "ear", "nose", "nose tip"], 0.3))
FACE_FOREGROUND = _per_label(FACE_LABELS, dict.fromkeys(FACE_LABELS[FACE["shirt"]:FACE["occluder"]], 1.0))
BIRD_GRAIN = _per_label(BIRD_LABELS, dict.fromkeys(BIRD_LABELS, 0.07) | {"background": 0.3, "clutter": 0.3})
BIRD_STREAKS = _per_label(BIRD_LABELS, dict.fromkeys(["left wing", "right wing", "tail", "perch"], 0.2))
BIRD_FOREGROUND = _per_label(BIRD_LABELS, dict.fromkeys(BIRD_LABELS[BIRD["perch"] + 1:], 1.0))


def _draw_params(seed, stream, number, spec):
    """One value per entry of `spec` ({name: (low, high)}: a uniform float; {name: k}: an int in [0, k)),
    from a random stream of its own for (seed, stream, number)."""
    u = np.random.default_rng((seed << 48) | (stream << 44) | number).random(len(spec)).tolist()
    return {name: int(x * v) if isinstance(v, int) else v[0] + (v[1] - v[0]) * x
            for x, (name, v) in zip(u, spec.items())}


def _arc(start, stop, n, endpoint=True):
    """n points (cos t, sin t) of the unit circle for t from start to stop, (n, 2)."""
    t = np.linspace(start, stop, n, endpoint=endpoint)
    return np.column_stack([np.cos(t), np.sin(t)])


def _circle(n):
    return _arc(0.0, 2 * math.pi, n, endpoint=False)


def _ellipse(centre, rx, ry, n=16):
    """An ellipse as a polygon of n vertices, (n, 2)."""
    return np.asarray(centre, float) + _circle(n) * [rx, ry]


LENS_X = np.concatenate([np.linspace(-1, 1, 13), np.linspace(1, -1, 13)[1:-1]])  # 13 upper, 11 lower vertices


def _lens(half_width, upper, lower):
    """A lens between two parabolas through (-half_width, 0) and (half_width, 0), bulging by `upper` and
    `lower` at x = 0 (an eye's lids, lips): the upper arc left to right, then the lower one back, (24, 2)."""
    return np.column_stack([half_width * LENS_X, np.where(np.arange(24) < 13, upper, lower) * (1 - LENS_X ** 2)])


def _unit(v):
    return v / np.linalg.norm(v)


def _cut(points, normal, offset):
    """The vertices of a convex polygon (N, 2) beyond a line, points @ normal >= offset (the cut edge is a
    chord between two vertices, not exactly the line: fine for colour patches)."""
    return points[points @ normal >= offset]


@functools.lru_cache(maxsize=8)
def _textures(size):
    """Two noise textures (2, T, T), T = 256 S / 96 (the same grain per scene unit at every size S), made once
    per process: grain (value noise over octaves) and vertical streaks (hair, feathers, bark); unit variance."""
    rng, side = np.random.default_rng(96), round(256 * size / 96)

    def noise(grids):  # random grids, upsampled bilinearly and summed with the weights 0.7 ** octave
        grids = [Image.fromarray(rng.standard_normal(grid).astype(np.float32)) for grid in grids]
        total = sum(0.7 ** octave * np.asarray(grid.resize((side, side), Image.BILINEAR))
                    for octave, grid in enumerate(grids))
        return (total - total.mean()) / total.std()
    return np.stack([noise([(g, g) for g in (4, 8, 16, 32, 64, 128)]), noise([(g // 8, g) for g in (32, 64, 128)])])


def _light(rng, size, strongest):
    """A lighting ramp (S, S): 1 + strength * (the pixel's coordinate along a random direction)."""
    angle, strength, axis = rng.uniform(0, 2 * math.pi), rng.uniform(0, strongest), np.linspace(-1, 1, size)
    return 1 + strength * (math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None])


class _Synthetic(Dataset):
    """What faces and birds share: splits, identities, parameters, drawing, colouring and the sample dict."""

    def __init__(self, split, size, length, seed, normalize, mean, std, identity_spec, pose_spec, streams):
        if split not in SPLIT_CODES:
            raise DatasetError(f"unknown split {split!r}; expected one of: train, val, test")
        side = size[0] if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1] else size
        if not isinstance(side, (int, np.integer)) or not 16 <= side <= 4096:
            raise DatasetError(f"synthetic images are square, 16 to 4096 pixels wide: expected size S or (S, S), "
                               f"got {size!r}")
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if int(seed) < 0 or not 0 < self.length <= IDENTITY_BLOCK:
            raise DatasetError(f"the seed is >= 0 and the length in 1..{IDENTITY_BLOCK}; got {seed}, {length}")
        self.split, self.seed, self.normalize, self.size = split, int(seed), normalize, (int(side), int(side))
        self.mean, self.std, self.has_mask, self.poses_per_identity = mean, std, True, 4
        self.identity_spec, self.pose_spec, self.streams = identity_spec, pose_spec, streams

    def __len__(self):
        return self.length

    def identity(self, index):
        """Global identity id of sample `index`; the id ranges of train, val and test are disjoint."""
        return SPLIT_CODES[self.split] * IDENTITY_BLOCK + index // self.poses_per_identity

    def identity_params(self, identity):
        """The shape and appearance of `identity` (a global id, see identity()): a dict of numbers."""
        return _draw_params(self.seed, self.streams[0], identity, self.identity_spec)

    def pose_params(self, index):
        """The pose, expression and scene seed of sample `index` (whatever its identity): a dict of numbers."""
        return _draw_params(self.seed, self.streams[1], SPLIT_CODES[self.split] << 40 | index, self.pose_spec)

    def params(self, index):
        """Every number sample `index` is drawn from: its identity_params and its pose_params."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of length {self.length}")
        return {**self.identity_params(self.identity(index)), **self.pose_params(index)}

    def __getitem__(self, index):
        sample = self.render(self.params(index))
        sample["identity"], sample["index"] = self.identity(index), index
        return sample

    def _draw(self, rng, polygons, colours, clutter, spread):
        """The label map (S, S): the background (label 0); with `clutter`, 4 to CLUTTER random ellipses, boxes
        and triangles (labels 1, 2, ...; their colours near colours[0], spread by `spread`); then `polygons`
        [(label id, (N, 2) pixels)] in order."""
        size = self.size[0]
        canvas = Image.new("L", (size, size), 0)
        shapes = rng.random((int(rng.integers(4, CLUTTER + 1)) if clutter else 0, 10))  # 10 numbers per shape
        for label, (w, h, angle, x, y, corners, tint, *hue) in enumerate(shapes.tolist(), 1):
            turn = np.array([[math.cos(math.pi * angle), math.sin(math.pi * angle)],
                             [-math.sin(math.pi * angle), math.cos(math.pi * angle)]])
            shape = _ellipse([0, 0], 0.1 + 0.4 * w, 0.1 + 0.4 * h, (3, 4, 16)[int(3 * corners)]) @ turn
            polygons.insert(label - 1, (label, (shape + [2 * x, 2 * y]) * (size - 1) / 2))  # centres in [-1, 1]
            colours[label] = np.clip(colours[0] * (0.6 + 0.8 * tint) + spread * (2 * np.array(hue) - 1), 0, 1)
        draw = ImageDraw.Draw(canvas)
        for label, pixels in polygons:
            if len(pixels) >= 3:  # (a cut patch can be empty)
                draw.polygon((pixels + 0.5).ravel().tolist(), fill=label)  # +0.5: docs/protocol.md, section 8
        return np.asarray(canvas).astype(np.intp)

    def _sample(self, rng, labels, colours, grain, streaks, light, foreground, keypoints, visible, with_labels):
        """The sample dict. A pixel's colour is its label's colour times (light + the label's share of each
        noise texture); the textures are cropped at a random place. labels (S, S); colours (L, 3); grain,
        streaks and foreground (L,); light (S, S)."""
        size = len(labels)
        textures = _textures(size)
        y, x = rng.integers(0, textures.shape[1] - size + 1, 2)
        grainy, streaky = textures[:, y:y + size, x:x + size]
        image = np.take(colours.T, labels, axis=1) * (light + grain[labels] * grainy + streaks[labels] * streaky)
        image = np.clip(image, 0, 1, dtype=np.float32)  # (3, S, S)
        if self.normalize:
            image = (image - np.float32(self.mean)[:, None, None]) / np.float32(self.std)[:, None, None]
        sample = {"image": torch.from_numpy(image), "keypoints": torch.from_numpy(keypoints.astype(np.float32)),
                  "visible": torch.from_numpy(visible), "mask": torch.from_numpy(foreground[labels][None])}
        if with_labels:
            sample["labels"] = torch.from_numpy(labels.astype(np.int64))
        return sample


# --- Faces. Head coordinates: x right, y down, origin at the face's centre, in scene units. ------------------
FACE_IDENTITY = {  # shape and appearance
    "head_w": (0.60, 0.72), "head_h": (0.84, 0.95), "chin": (0.0, 0.35),  # ellipse half-axes; jaw taper
    "eye_y": (-0.19, -0.09), "eye_dx": (0.40, 0.48), "eye_w": (0.075, 0.100),  # eye x = eye_dx * head_w
    "eye_tilt": (-0.10, 0.20), "iris": (0.38, 0.48), "brow_gap": (0.08, 0.13), "brow_thick": (0.022, 0.042),
    "brow_len": (1.1, 1.4), "brow_arch": (0.005, 0.04), "nose_y": (0.16, 0.27), "nose_w": (0.065, 0.10),
    "nose_depth": (0.10, 0.22), "mouth_y": (0.44, 0.56), "mouth_w": (0.17, 0.25), "lip_up": (0.018, 0.035),
    "lip_low": (0.025, 0.05), "ear": (0.8, 1.2), "skin": (0.0, 1.0), "hair_colour": len(HAIR),
    "hair_shade": (0.8, 1.2), "eye_colour": len(EYES), "lip_tint": (0.55, 0.8), "shirt": (0.0, 1.0),
    "hair_volume": (1.03, 1.13), "hairline": (-0.80, -0.50), "side_len": (-0.35, 0.35),
    "side_thick": (0.06, 0.22), "long_hair": (0.0, 1.0), "glasses": (0.0, 1.0),
}
FACE_POSE = {  # expression (mouth_open <= 0: closed) and the scene's random seed
    "mouth_open": (-0.06, 0.07), "smile": (-0.3, 1.0), "eye_open": (0.45, 1.0), "gaze_x": (-1.0, 1.0),
    "gaze_y": (-1.0, 1.0), "brow_raise": (0.0, 1.0), "scene": 2 ** 31,
}
FACE_HEAD = {  # head pose per variant: yaw and roll in radians; x and y place the face's centre
    "aligned": {"yaw": (-0.14, 0.14), "roll": (-0.05, 0.05), "scale": (0.97, 1.03), "x": (-0.03, 0.03),
                "y": (-0.03, 0.03)},
    "wild": {"yaw": (-0.45, 0.45), "roll": (-0.52, 0.52), "scale": (0.45, 0.85), "x": (-1.0, 1.0),
             "y": (-1.0, 1.0)},
}
FACE_HEAD["clutter"] = FACE_HEAD["aligned"]  # aligned geometry (and numbers) in wild scenes


class SyntheticFaces(_Synthetic):
    """Procedural faces with MAFL-style (5) or dense (33, 300-W-like) landmarks."""

    def __init__(self, split="train", variant="aligned", annotation="mafl", size=96, length=None, seed=0,
                 normalize=True):
        if variant not in FACE_HEAD:
            raise DatasetError(f"unknown face variant {variant!r}; expected 'aligned', 'clutter' or 'wild'")
        if annotation not in ("mafl", "dense"):
            raise DatasetError(f"unknown face annotation {annotation!r}; expected 'mafl' or 'dense'")
        super().__init__(split, size, length, seed, normalize, FACE_MEAN, FACE_STD, FACE_IDENTITY,
                         FACE_POSE | FACE_HEAD[variant], (0, 1 + (variant == "wild")))
        self.variant, self.annotation, self.label_names, self.metric = variant, annotation, FACE_LABELS, "iod"
        self.name = "synth-faces" + f"-{variant}" * (variant != "aligned") + "-dense" * (annotation == "dense")
        self.landmark_names = list(MAFL_NAMES if annotation == "mafl" else DENSE_FACE_NAMES)
        self.num_landmarks = len(self.landmark_names)
        self.eye_indices = (0, 1) if annotation == "mafl" else (19, 25)  # dense: the outer eye corners

    def render(self, p, with_labels=False):
        """Draw the face of the parameter dict `p` (from params(), or edited). Returns the sample dict without
        identity and index; with_labels=True adds "labels", the (S, S) int64 label map."""
        rng, size, scenic = np.random.default_rng(p["scene"]), self.size[0], self.variant != "aligned"
        a, b, ew, ex, ey = p["head_w"], p["head_h"], p["eye_w"], p["head_w"] * p["eye_dx"], p["eye_y"]
        shapes, marks = [], {}  # [(label, (N, 2) points, (N,) lift)] in drawing order; {name: (x, y, lift)}

        def add(label, points, lift=0.0):  # lift: how far a point stands out of the head (the nose does)
            shapes.append((label, np.asarray(points, float), lift + np.zeros(len(points))))

        # Behind the face: long hair, the shirt, the neck and the ears.
        if p["long_hair"] > 0.55:
            length, volume = b * (0.3 + 0.8 * (p["long_hair"] - 0.55) / 0.45), p["hair_volume"]
            crown = _arc(math.pi, 2 * math.pi, 16) * [1.08 * a * volume, b * volume]
            add("hair", np.concatenate([[[-1.2 * a, length]], crown, [[1.2 * a, length]]]))
        add("shirt", [[-0.45 * a / 0.65, 0.78 * b], [0.45 * a / 0.65, 0.78 * b], [2 * a, 1.15 * b], [2.5 * a, 2.2 * b],
                      [-2.5 * a, 2.2 * b], [-2 * a, 1.15 * b]])
        add("neck", np.array([[-0.5, 0.0], [0.5, 0.0], [0.52, 1.0], [0.0, 1.12], [-0.52, 1.0]]) * [a, b])
        for side in (-1, 1):
            add("ear", _ellipse([side * 0.98 * a, 0.08 * b], 0.14 * a * p["ear"], 0.2 * b * p["ear"]))

        # The face: an ellipse whose lower half narrows towards the chin. The jaw landmarks lie on it from the
        # image-left ear level (at 180 degrees) round the chin (90: y points down) to the image-right.
        def outline(t):
            return np.column_stack([a * np.cos(t) * (1 - p["chin"] * np.maximum(np.sin(t), 0) ** 2), b * np.sin(t)])
        add("skin", outline(np.linspace(0, 2 * math.pi, 48, endpoint=False)))
        marks |= {f"jaw {k + 1}": (x, y, 0.0) for k, (x, y) in enumerate(outline(np.linspace(math.pi, 0, 9)))}

        # Brows: bands round an arched centre line from the inner end (s = -1) to the outer end (s = 1),
        # thinner outwards, raised by brow_raise; landmarks on the centre line at the ends and the middle.
        s = np.linspace(-1, 1, 9)
        x = ex + 0.1 * ew + s * ew * p["brow_len"]
        y = ey - p["brow_gap"] - 0.035 * p["brow_raise"] - p["brow_arch"] * (1 - s ** 2)
        half = 0.5 * p["brow_thick"] * (1 - 0.175 * (s + 1))
        for side, name in ((-1, "left"), (1, "right")):
            band = np.concatenate([np.column_stack([x, y - half]), np.column_stack([x, y + half])[::-1]])
            add("brow", band * [side, 1])
            marks |= {f"{name} brow {end}": (side * x[k], y[k], 0.0) for k, end in ((0, "inner"), (4, "middle"),
                                                                                     (8, "outer"))}

        # Hair on the head, drawn over the brows as a fringe would be: the outline swollen by hair_volume,
        # from the end of one side lock over the crown to the other, closed by the hairline (a parabola).
        hx, volume = np.linspace(1, -1, 13), p["hair_volume"]
        line = b * p["hairline"] + 0.25 * b * hx ** 2
        end = math.asin(min(max(b * p["side_len"], line[0] + 0.05 * b) / (b * volume), 0.95))  # lock ends
        crown = _arc(math.pi - end, 2 * math.pi + end, 24) * [a * volume, b * volume]
        add("hair", np.concatenate([crown, np.column_stack([hx * a * (1 - p["side_thick"]), line])]))

        # Nose: a wedge from the bridge to the nostril wings that stands out more towards the tip, and the tip.
        ny, nw, depth = p["nose_y"], p["nose_w"], p["nose_depth"]
        add("nose", [[-0.02, ey + 0.04], [-nw, ny - 0.01], [-0.5 * nw, ny + 0.04], [0.5 * nw, ny + 0.04],
                     [nw, ny - 0.01], [0.02, ey + 0.04]], depth * np.array([0.1, 0.5, 0.9, 0.9, 0.5, 0.1]))
        add("nose tip", _ellipse([0, ny], 0.38 * nw, 0.3 * nw), depth)
        marks |= {"nose bridge": (0, ey + 0.04, 0.1 * depth), "nose tip": (0, ny, depth),
                  "left nostril wing": (-nw, ny - 0.01, 0.5 * depth),
                  "right nostril wing": (nw, ny - 0.01, 0.5 * depth)}

        # Eyes, made in an eye frame (x towards the outer corner, y down, origin between the corners): the
        # lids, opened by eye_open; the iris (its centre is the MAFL landmark, moved by the gaze) and the
        # pupil, clipped to the opening. Then the outer corner is tilted up by eye_tilt, the left eye mirrored.
        up, low = 0.65 * ew * p["eye_open"], 0.5 * ew * p["eye_open"]
        cos_t, sin_t = math.cos(p["eye_tilt"]), math.sin(p["eye_tilt"])

        def opening(points):
            x = np.clip(points[:, 0], -ew, ew)
            return np.column_stack([x, np.clip(points[:, 1], -up * (1 - (x / ew) ** 2), low * (1 - (x / ew) ** 2))])

        for side, name in ((-1, "left"), (1, "right")):
            def to_head(points):  # (N, 2) in the eye frame
                x, y = points.T
                return np.column_stack([side * (cos_t * x + sin_t * y + ex), cos_t * y - sin_t * x + ey])
            iris = [side * 0.3 * ew * p["gaze_x"], 0.1 * ew * p["gaze_y"]]
            add("sclera", to_head(_lens(ew, -up, low)))
            for label, radius in (("iris", p["iris"] * ew), ("pupil", 0.45 * p["iris"] * ew)):
                add(label, to_head(opening(_ellipse(iris, radius, radius))))
            points = {"": iris, " outer corner": (ew, 0), " upper lid": (0, -up), " inner corner": (-ew, 0),
                      " lower lid": (0, low)}
            for k, (x, y) in zip(points, to_head(np.array(list(points.values())))):
                marks[f"{name} eye{k}"] = (x, y, 0.0)

        # Mouth: lip curves through the corners, which a smile lifts; an open mouth parts the inner curves and
        # shows the mouth and the upper teeth.
        gap, my, smile = max(p["mouth_open"], 0) / 2, p["mouth_y"], 0.045 * p["smile"]
        mw = p["mouth_w"] * (1 + 0.1 * p["smile"])

        def mouth(upper, lower):
            lens = _lens(mw, upper, lower)
            return lens + np.column_stack([0 * lens[:, 0], my - smile * (lens[:, 0] / mw) ** 2])
        add("lips", mouth(-p["lip_up"] - gap, p["lip_low"] + gap), 0.03)
        if gap > 0.002:
            add("mouth", mouth(-gap, gap), 0.03)
            add("teeth", mouth(-gap, min(2 * gap, 0.025) - gap), 0.03)
        marks |= {"left mouth corner": (-mw, my - smile, 0.03), "right mouth corner": (mw, my - smile, 0.03),
                  "upper lip top": (0, my - p["lip_up"] - gap, 0.03), "upper lip inner": (0, my - gap, 0.03),
                  "lower lip bottom": (0, my + p["lip_low"] + gap, 0.03), "lower lip inner": (0, my + gap, 0.03)}

        # Wild scenes: glasses (an identity trait: two rims and a bridge), a foreign object in front of the face.
        if scenic and p["glasses"] > 0.65:
            for side in (-1, 1):  # a ring: the outer ellipse, then the inner one backwards
                outer, inner = (_ellipse([side * ex, ey], 1.45 * ew + d, 1.15 * ew + d) for d in (0.012, -0.012))
                add("glasses", np.concatenate([outer, inner[::-1]]))
            add("glasses", [[1.4 * ew - ex, ey - 0.012], [ex - 1.4 * ew, ey - 0.012], [ex - 1.4 * ew, ey + 0.012],
                            [1.4 * ew - ex, ey + 0.012]], 0.05)
        if scenic and rng.random() < 0.25:
            x, y, _ = marks[MAFL_NAMES[rng.integers(5)]]
            radius = rng.uniform(0.25, 0.6)
            add("occluder", _ellipse([x + rng.uniform(-0.3, 0.3), y + rng.uniform(-0.3, 0.3)], radius, radius))

        # Head pose, one transform for every point: a point of the bulging head has the depth
        # z = 0.6 a (1 - (x/a)^2 - (y/b)^2) (0 outside the outline) plus its lift, and turns with the yaw to
        # x cos(yaw) + z sin(yaw); then roll, scale, translation (wild: the face centre stays in the image).
        cos_y, sin_y, cos_r, sin_r = math.cos(p["yaw"]), math.sin(p["yaw"]), math.cos(p["roll"]), math.sin(p["roll"])
        scale, room = p["scale"], 1 - 0.5 * p["scale"] if self.variant == "wild" else 1
        tx, ty = room * p["x"], room * p["y"]

        def to_pixels(points, lift):
            x, y = points.T
            x = x * cos_y + (0.6 * a * np.maximum(1 - (x / a) ** 2 - (y / b) ** 2, 0) + lift) * sin_y
            u, v = scale * (cos_r * x - sin_r * y) + tx, scale * (sin_r * x + cos_r * y) + ty
            return (np.column_stack([u, v]) + 1) * (size - 1) / 2

        points, lifts = (np.concatenate([shape[k] for shape in shapes]) for k in (1, 2))
        pixels = np.split(to_pixels(points, lifts), np.cumsum([len(shape[1]) for shape in shapes])[:-1])
        keypoints = np.array([marks[name] for name in self.landmark_names])
        keypoints = to_pixels(keypoints[:, :2], keypoints[:, 2])
        visible = ((keypoints >= 0) & (keypoints <= size - 1)).all(1)

        t, hair = p["skin"], np.minimum(HAIR[p["hair_colour"]] * p["hair_shade"], 1)
        skin = (1 - t) * np.array([0.97, 0.84, 0.74]) + t * np.array([0.34, 0.22, 0.15])  # light to dark
        colours = np.zeros((len(FACE_LABELS), 3), np.float32)
        colours[0] = rng.uniform(0.15, 0.85, 3)
        for name, colour in {"skin": skin, "ear": 0.95 * skin, "neck": 0.85 * skin, "nose": 0.92 * skin,
                             "nose tip": skin, "lips": skin * [1, p["lip_tint"], p["lip_tint"]],
                             "hair": hair, "brow": 0.8 * hair, "iris": EYES[p["eye_colour"]],
                             "shirt": 0.25 + 0.2 * np.abs((6 * p["shirt"] + np.array([0, 2, 4])) % 6 - 3),  # hue
                             "sclera": (0.95, 0.93, 0.9), "pupil": 0.03, "mouth": (0.25, 0.05, 0.05),
                             "teeth": (0.92, 0.9, 0.85), "glasses": (0.1, 0.1, 0.12),
                             "occluder": rng.uniform(0.1, 0.9, 3)}.items():
            colours[FACE[name]] = colour
        labels = self._draw(rng, [(FACE[shape[0]], q) for shape, q in zip(shapes, pixels)], colours, scenic, 0.25)

        # Light: a ramp across the image, and skin that darkens towards the face's outline like a lit ball, by
        # r^2 of the pixel in the head ellipse's frame (the pose undone, the yaw taken as a narrowing).
        axis = np.linspace(-1, 1, size)
        u, v = axis[None, :] - tx, axis[:, None] - ty  # (1, S), (S, 1): from the face's centre
        r2 = ((cos_r * u + sin_r * v) / (scale * a * cos_y)) ** 2 + ((cos_r * v - sin_r * u) / (scale * b)) ** 2
        light = _light(rng, size, 0.35 if scenic else 0.15) - FACE_SHADED[labels] * np.minimum(r2, 1.5)
        grain = FACE_GRAIN.copy()
        grain[:CLUTTER + 1] = 0.22 if scenic else 0.04  # background and clutter
        return self._sample(rng, labels, colours, grain, FACE_STREAKS, light, FACE_FOREGROUND, keypoints, visible,
                            with_labels)


# --- Birds. World coordinates: x right, y up, z towards the viewer; lengths in body half-lengths. ------------
BIRD_IDENTITY = {  # the "species": shape and plumage
    "body_h": (0.50, 0.64), "body_w": (0.42, 0.55), "head_r": (0.34, 0.46), "head_x": (0.85, 1.05),
    "head_up": (0.55, 0.90), "beak_len": (0.15, 0.60), "beak_w": (0.07, 0.15), "beak_droop": (-0.1, 0.35),
    "eye_r": (0.06, 0.09), "tail_len": (0.6, 1.2), "tail_w": (0.16, 0.36), "tail_droop": (-0.2, 0.6),
    "leg_len": (0.18, 0.38), "wing_len": (1.0, 1.35), "wing_h": (0.28, 0.40), "main": len(PLUMAGE),
    "main_shade": (0.75, 1.15), "belly": len(PLUMAGE), "belly_line": (-0.5, 0.3), "breast": (0.0, 1.0),
    "cap": len(PLUMAGE), "cap_line": (0.1, 1.3), "wing": len(PLUMAGE),
    "wing_shade": (0.55, 1.0), "beak_colour": len(BEAKS), "leg_colour": len(LEGS),
}
BIRD_POSE = {  # view in radians (0: side view, > 0: turned towards the viewer) and the scene's random seed
    "facing_right": 2, "view": (-0.87, 0.87), "pitch": (0.15, 0.70), "head_turn": (-0.5, 0.5),
    "head_pitch": (-0.25, 0.3), "wing_raise": (0.0, 1.0), "stride": (-0.3, 0.3), "fill": (0.55, 0.85),
    "x": (-1.0, 1.0), "y": (-1.0, 1.0), "perch_tilt": (-0.25, 0.25), "scene": 2 ** 31,
}


class SyntheticBirds(_Synthetic):
    """Procedural perched birds with the 15 CUB parts and computed visibility; see the section comment. A
    bird is a 3D model (ellipsoid body, spherical head, conical beak, flat wings and tail, stick legs) seen by
    an orthographic camera and drawn back to front."""

    def __init__(self, split="train", size=96, length=None, seed=0, normalize=True):
        super().__init__(split, size, length, seed, normalize, IMAGENET_MEAN, IMAGENET_STD, BIRD_IDENTITY,
                         BIRD_POSE, (3, 4))
        self.name, self.landmark_names, self.num_landmarks = "synth-birds", list(CUB_NAMES), len(CUB_NAMES)
        self.eye_indices, self.metric, self.label_names = None, "pck", BIRD_LABELS

    def render(self, p, with_labels=False):
        """Draw the bird of the parameter dict `p` (from params(), or edited). Returns the sample dict without
        identity and index; with_labels=True adds "labels", the (S, S) int64 label map."""
        rng, size, facing = np.random.default_rng(p["scene"]), self.size[0], -math.sin(math.radians(25))
        groups = []  # [(depth, [(label, (N, 2) world x, y)])]: drawn from the farthest group to the nearest
        marks = {}  # {name: ((3,) world point, the part it lies on, whether that surface faces the viewer)}

        # The bird's frame: forward, up and its own left = up x forward; the body's axis rises by the pitch.
        heading = p["view"] if p["facing_right"] else math.pi - p["view"]
        forward, up = np.array([math.cos(heading), 0, math.sin(heading)]), np.array([0.0, 1, 0])
        left = np.cross(up, forward)
        ax = math.cos(p["pitch"]) * forward + math.sin(p["pitch"]) * up
        ax_up = np.cross(ax, left)

        # Body: an ellipsoid with semi-axes the columns of A; its outline is the ellipse U diag(s) (circle)
        # from the SVD of A's x and y rows. Belly and breast patches are cut from the outline. Back, belly,
        # breast lie along directions d of the body's (axis, up) plane, where the ellipsoid's normal is A^-T d.
        A = np.column_stack([ax, p["body_h"] * ax_up, p["body_w"] * left])
        U, s, _ = np.linalg.svd(A[:2])
        outline, down, front = _ellipse([0, 0], s[0], s[1], 32) @ U.T, _unit(-ax_up[:2]), _unit(ax[:2])
        shapes = [("body", outline), ("belly", _cut(outline, down, p["belly_line"] * p["body_h"]))]
        if p["breast"] > 0.5:
            shapes.append(("breast", _cut(_cut(outline, front, 0.35), down, -0.4 * p["body_h"])))
        groups.append((0.0, shapes))
        for name, d in (("back", (-0.4, 1.0)), ("belly", (-0.1, -1.0)), ("breast", (0.8, -0.5))):
            d = _unit(np.array(d))
            normal = _unit(d[0] * ax + d[1] / p["body_h"] * ax_up)
            marks[name] = (0.85 * (d[0] * ax + d[1] * p["body_h"] * ax_up), "body", normal[2] > facing)

        # Head: a sphere of radius r turned by head_turn and pitched by head_pitch (frame hf, hl, hu), with a
        # cap; crown, forehead, nape and throat lie along directions of its (hf, hu) plane. An eye is a disc
        # tangent to the sphere, drawn only while it faces the viewer. The head is drawn after the body even
        # when its centre is a little farther: it sits on the body's front end.
        r, turn, tilt = p["head_r"], p["head_turn"], p["head_pitch"]
        hf = math.cos(tilt) * (math.cos(turn) * forward + math.sin(turn) * left) + math.sin(tilt) * up
        hl = -math.sin(turn) * forward + math.cos(turn) * left
        hu = np.cross(hf, hl)
        head = p["head_x"] * ax + p["head_up"] * p["body_h"] * ax_up
        outline, crown = _ellipse(head[:2], r, r, 32), _unit(hu[:2] + 1e-9)
        shapes = [("head", outline)]
        if p["cap_line"] < 0.9:
            shapes.append(("cap", _cut(outline, crown, crown @ head[:2] + p["cap_line"] * r)))
        for name, d in (("crown", (-0.15, 1.0)), ("forehead", (0.75, 0.66)), ("nape", (-0.9, 0.2)),
                        ("throat", (0.5, -0.85))):
            normal = _unit(d[0] * hf + d[1] * hu)
            marks[name] = (head + 0.85 * r * normal, "head", normal[2] > facing)
        for name, side in (("left eye", 1), ("right eye", -1)):
            normal = _unit(0.37 * hf + 0.3 * hu + side * 0.88 * hl)  # on the side of the head, a little up
            marks[name] = (head + r * normal, name, True)
            if normal[2] > 0:
                t1 = _unit(hu - (hu @ normal) * normal)  # t1, t2: the disc's plane, tangent to the head
                t2 = np.cross(normal, t1)
                shapes.append((name, marks[name][0][:2] + p["eye_r"] * _circle(16) @ [t1[:2], t2[:2]]))
        groups.append((max(head[2], 0.01), shapes))

        # Beak: a cone along hf drooping along -hu, seen as its base disc plus the triangle from the tip to
        # the two base points farthest from the cone's projected axis.
        base = head + 0.8 * r * hf
        tip = head + (r + p["beak_len"]) * hf - p["beak_droop"] * p["beak_len"] * hu
        rim = base[:2] + p["beak_w"] * _circle(16) @ np.array([hu[:2], hl[:2]])
        across = rim @ [base[1] - tip[1], tip[0] - base[0]]
        marks["beak"] = (base + 0.6 * (tip - base), "beak", True)
        groups.append((marks["beak"][0][2], [("beak", rim), ("beak", [tip[:2], rim[across.argmax()],
                                                                        rim[across.argmin()]])]))

        # Wings: flat teardrops hinged at the shoulders in the plane (wa, wu), the tip backwards, rounded at
        # the shoulder and pointed at the tip; four birds in five keep them folded, the others raise them.
        lift = max(p["wing_raise"] - 0.8, 0) / 0.2 * 0.9 - 0.12  # radians
        wa, wu = -math.cos(lift) * ax + math.sin(lift) * ax_up, math.sin(lift) * ax + math.cos(lift) * ax_up
        along = 0.5 - 0.5 * _circle(32)[:, :1]  # 0 at the shoulder, 1 at the tip
        wing = along * p["wing_len"] * wa[:2] + _circle(32)[:, 1:] * p["wing_h"] * (1 - 0.7 * along) * wu[:2]
        for name, side in (("left wing", 1), ("right wing", -1)):
            shoulder = 0.45 * ax + 0.25 * p["body_h"] * ax_up + side * 0.85 * p["body_w"] * left
            marks[name] = (shoulder + 0.4 * p["wing_len"] * wa, name, True)
            groups.append((marks[name][0][2], [(name, shoulder[:2] + wing)]))

        # Tail: a wedge in the body's vertical plane plus a fan in the horizontal one, so every view shows it.
        ta = -math.cos(p["tail_droop"]) * ax - math.sin(p["tail_droop"]) * ax_up
        tu = -math.sin(p["tail_droop"]) * ax + math.cos(p["tail_droop"]) * ax_up
        root, end = -0.8 * ax[:2], (-0.8 * ax + p["tail_len"] * ta)[:2]
        wedge, width = np.array([root, end, end, root]), np.array([[0.1], [p["tail_w"]], [-p["tail_w"]], [-0.1]])
        marks["tail"] = (-0.8 * ax + 0.55 * p["tail_len"] * ta, "tail", True)
        groups.append((marks["tail"][0][2], [("tail", wedge + width * tu[:2]), ("tail", wedge + width * left[:2])]))

        # Legs: straight down from inside the body to the feet, one a stride ahead of the other; drawn first,
        # since they hang below the body, whose outline hides their tops.
        bottom = -np.linalg.norm(A[1])  # the body's lowest point (world y)
        foot = bottom - p["leg_len"]
        for name, side in (("left leg", 1), ("right leg", -1)):
            x, _, z = side * (0.35 * p["body_w"] * left + p["stride"] * forward)  # the hip
            toe = 0.2 * forward[0]
            marks[name] = (np.array([x, foot + 0.3 * p["leg_len"], z]), name, True)
            groups.append((z - 10, [(name, [[x - 0.035, bottom / 2], [x - 0.035, foot], [x + 0.035, foot],
                                            [x + 0.035, bottom / 2]]),
                                    (name, [[x + toe, foot], [x, foot + 0.04], [x - 0.6 * toe, foot],
                                            [x, foot - 0.02]])]))

        # Framing: the bird's bounding box spans `fill` of the image at a random place in it (image y is down).
        groups.sort(key=lambda group: group[0])
        shapes = [(label, np.asarray(points, float)) for _, group in groups for label, points in group]
        every = np.concatenate([points for _, points in shapes])
        low, high = every.min(0), every.max(0)
        scale = 2 * p["fill"] / (high - low).max()
        centre = np.array([p["x"], -p["y"]]) * (1 - scale * (high - low) / 2)

        def to_pixels(points):
            return ((points[:, :2] - (low + high) / 2) * [scale, -scale] + centre + 1) * (size - 1) / 2

        pixels = np.split(to_pixels(every), np.cumsum([len(points) for _, points in shapes])[:-1])
        keypoints = to_pixels(np.array([marks[name][0] for name in CUB_NAMES]))
        # The perch: a slightly tilted band whose top edge passes just under the feet.
        feet = (keypoints[CUB_NAMES.index("left leg")] + keypoints[CUB_NAMES.index("right leg")]) / 2
        top, thick = feet[1] + 0.32 * p["leg_len"] * scale * (size - 1) / 2, rng.uniform(0.04, 0.08) * size
        ys = top + p["perch_tilt"] * (np.array([-0.1, 1.1]) * size - feet[0])
        perch = [[-0.1 * size, ys[0]], [1.1 * size, ys[1]], [1.1 * size, ys[1] + thick], [-0.1 * size, ys[0] + thick]]

        main = np.minimum(PLUMAGE[p["main"]] * p["main_shade"], 1)
        belly, wing = PLUMAGE[p["belly"]], np.minimum(PLUMAGE[p["wing"]] * p["wing_shade"], 1)
        colours = np.zeros((len(BIRD_LABELS), 3), np.float32)
        colours[0] = rng.uniform([0.2, 0.3, 0.2], [0.7, 0.8, 0.8])
        for name, colour in {"body": main, "head": main, "belly": belly, "breast": (belly + main) / 2,
                             "cap": PLUMAGE[p["cap"]], "left wing": wing, "right wing": wing, "tail": 0.85 * wing,
                             "beak": BEAKS[p["beak_colour"]], "left leg": LEGS[p["leg_colour"]],
                             "right leg": LEGS[p["leg_colour"]], "left eye": 0.03, "right eye": 0.03,
                             "perch": rng.uniform(0.25, 0.5) * np.array([1.0, 0.8, 0.6])}.items():
            colours[BIRD[name]] = colour
        polygons = [(BIRD["perch"], np.array(perch))] + [(BIRD[label], q) for (label, _), q in zip(shapes, pixels)]
        labels = self._draw(rng, polygons, colours, True, 0.15)

        # Visibility: in the image, its own part on top at its pixel, and (surface points) facing the viewer.
        x, y = np.clip(np.rint(keypoints).astype(int), 0, size - 1).T
        on_top = [BIRD_PART.get(BIRD_LABELS[label], BIRD_LABELS[label]) == marks[name][1] and marks[name][2]
                  for name, label in zip(CUB_NAMES, labels[y, x])]
        visible = np.array(on_top) & ((np.rint(keypoints) >= 0) & (np.rint(keypoints) <= size - 1)).all(1)
        return self._sample(rng, labels, colours, BIRD_GRAIN, BIRD_STREAKS, _light(rng, size, 0.3), BIRD_FOREGROUND,
                            keypoints, visible, with_labels)


def contact_sheet(dataset, path, n=16):
    """Save a PNG grid of the first n samples of any dataset of data.py with their landmarks: filled dots are
    visible, hollow circles invisible."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    indices = range(min(n, len(dataset)))
    columns = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / columns)
    figure = Figure(figsize=(2.2 * columns, 2.3 * rows), dpi=110)
    FigureCanvasAgg(figure)
    colours = colormaps["hsv"](np.linspace(0, 1, dataset.num_landmarks, endpoint=False))  # (K, 4)
    for cell, index in enumerate(indices):
        sample, axes = dataset[index], figure.add_subplot(rows, columns, cell + 1)
        image = sample["image"]
        if getattr(dataset, "normalize", True):
            image = image * torch.tensor(dataset.std).view(3, 1, 1) + torch.tensor(dataset.mean).view(3, 1, 1)
        axes.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")  # centres at integers
        points, seen = sample["keypoints"].numpy(), sample["visible"].numpy().astype(bool)
        dot = 7 if len(points) <= 15 else 3
        axes.scatter(*points[seen].T, s=dot, c=colours[seen], edgecolors="black", linewidths=0.4)
        axes.scatter(*points[~seen].T, s=1.5 * dot, facecolors="none", edgecolors=colours[~seen], linewidths=0.8)
        axes.set_title(f"#{index}  id {sample['identity']}", fontsize=7)
        axes.set_axis_off()
    figure.suptitle(f"{dataset.name}: {len(indices)} samples, {dataset.num_landmarks} landmarks", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


# =========================================================================================================
# 3. Real datasets in the layouts their users have on disk (docs/protocol.md shows every layout and crop)
#
# A loader reads its annotation files once, into per-sample arrays (image paths, keypoints in 0-based source
# pixels, visibility, identity, the source window of a protocol crop). An item is one image resampled ONCE
# through out = scale * src + offset, the map its preprocessing reduces to; keypoints go through the same
# formula, so image and labels agree exactly. A split that a dataset lacks is held out of its training list by
# a fixed-seed shuffle. `visible` is the annotation's flag, also for points that leave the crop (the protocol
# scores them). A user's mistake raises DatasetError: one sentence naming the path and what it should hold.
# =========================================================================================================
HOLDOUT_SEED = 0  # seed of every held-out validation (and cat test) subset: fixed, so runs agree
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# MAFL_NAMES and CUB_NAMES name the real datasets' landmarks too; a face's "left" is the image's left.
W300_LANDMARKS = tuple(f"{part} {i + 1}" for part, count in (
    ("jaw", 17), ("left brow", 5), ("right brow", 5), ("nose bridge", 4), ("nose base", 5),
    ("left eye", 6), ("right eye", 6), ("outer lip", 12), ("inner lip", 8)) for i in range(count))
CAT_KEEP = (0, 1, 2, 3, 5, 6, 8)  # of the 9 cat points, drop the ear tips 4 and 7 (as Rahaman et al.)
CAT_LANDMARKS = ("left eye", "right eye", "mouth", "left ear 1", "left ear 3", "right ear 1", "right ear 3")
CELEBA_WILD_MARGIN = 1.25  # our choice: square side = 1.25 x the longer side of CelebA's face box
CAT_MARGIN = 1.5  # our choice: square side = 1.5 x the longer side of the box around the 9 cat points

# What each annotation file holds, in the words of the error messages.
PARTITION_FORMAT = "rows '<image> 0|1|2' (CelebA's list_eval_partition.txt)"
MTFL_FORMAT = "rows '<path> x1 ... x5 y1 ... y5' with 1-based pixels, optionally 4 attributes after"
AFLW_CSV_FORMAT = "a CSV with a header naming image_file, set, crop_file, then x1, y1, ..., x5, y5"
AFLW_MAT_FORMAT = "'gt' (N, 5, 2) keypoints as (y, x) and 'hw' (N, 2) image heights and widths"
BOXES_FORMAT = "'bounding_boxes', a cell array of structs with imgName and bb_ground_truth"
PTS_FORMAT = "a 300W .pts file: 'version: 1', 'n_points: 68', '{', 68 lines 'x y', '}'"
PARTS_FORMAT = "rows '<image id> <part id 1-15> x y <visible 0|1>'"
CAT_FORMAT = "a .cat file '9 x1 y1 ... x9 y9'"


def _window_map(left, top, width, height, resize, cut=0.0, edges=False):
    """(scale, offset), each (2,), of out = scale * src + offset: the source window resized to `resize` (w, h),
    then `cut` px removed per border. edges=False: the protocol crop, the reference's label formula
    (src - corner) * 136 / width - 20, which scales about pixel (0, 0)'s centre (the image is resampled to
    match); edges=True: the window's outer edges on the output's, as PIL resizes: (src + 0.5 - corner) s - 0.5."""
    scale = np.asarray(resize, np.float64) / (width, height)
    shift = 0.5 if edges else 0.0
    return scale, (shift - np.array([left, top])) * scale - shift - cut


def _resample(image, scale, offset, size):
    """Sample the PIL image through out = scale * src + offset into an image of `size` (H, W). PIL's
    resize(box=...) reads output pixel u at box_left + (u + 0.5) / s - 0.5; equal to (u - offset) / scale for
    box_left = 0.5 - (0.5 + offset) / scale. The box must lie inside the image, so first cut a patch around it
    (Image.crop fills outside the image with black), with a margin for the filter but not beyond the image, so
    edge pixels are filtered as in a plain resize."""
    out_h, out_w = size
    left, top = 0.5 - (0.5 + offset) / scale  # box corner, in source pixel-edge coordinates
    right, bottom = left + out_w / scale[0], top + out_h / scale[1]
    margin = math.ceil(1 / min(scale.min(), 1.0)) + 1  # filter support when shrinking, plus one
    x0 = min(math.floor(left), max(math.floor(left) - margin, 0))
    y0 = min(math.floor(top), max(math.floor(top) - margin, 0))
    x1 = max(math.ceil(right), min(math.ceil(right) + margin, image.width))
    y1 = max(math.ceil(bottom), min(math.ceil(bottom) + margin, image.height))
    return image.crop((x0, y0, x1, y1)).resize((out_w, out_h), Image.BILINEAR,
                                               box=(left - x0, top - y0, right - x0, bottom - y0))


# --- Reading files: every problem becomes one DatasetError sentence naming the path and the format -----------
def _bad(path, fmt, problem):
    return DatasetError(f"expected {path} to hold {fmt}, but {problem}")


def _check_split(split):
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, not {split!r}")


def _folder(path, what, split="train"):
    """The folder `path`, after checking the `split` a loader was asked for."""
    _check_split(split)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetError(f"expected {what} at {path}, but there is no such folder")
    return path


def _lines(path, fmt):
    """The non-blank lines of a text file as (line number, stripped text)."""
    if not path.is_file():
        raise DatasetError(f"expected {fmt} at {path}, but there is no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _bad(path, fmt, f"it cannot be read as text ({error})") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _split(lines, path, fmt, columns=None, sep=None):
    """(line number, fields) of each line, split at whitespace or as CSV (sep=","); `columns`: allowed counts."""
    allowed = {columns} if isinstance(columns, int) else columns
    rows = []
    for number, line in lines:
        fields = line.split() if sep is None else [f.strip() for f in next(csv.reader([line]))]
        if allowed is not None and len(fields) not in allowed:
            raise _bad(path, fmt, f"line {number} has {len(fields)} columns: {line[:80]!r}")
        rows.append((number, fields))
    return rows


def _table(path, fmt, columns=None, sep=None):
    return _split(_lines(path, fmt), path, fmt, columns, sep)


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _numbers(rows, path, fmt, start, stop):
    """Fields start:stop of every row as a float array (len(rows), stop - start)."""
    try:
        return np.array([f[start:stop] for _, f in rows], np.float64).reshape(len(rows), stop - start)
    except ValueError:
        number, fields = next((n, f) for n, f in rows if not all(map(_is_number, f[start:stop])))
        raise _bad(path, fmt, f"line {number} has a non-number: {' '.join(fields)!r}") from None


def _values_of(names, rows, path, fmt, num_values):
    """(len(names), num_values): the values of rows '<name> v1 ... vn' for `names`; each must have a row."""
    index = {f[0]: i for i, (_, f) in enumerate(rows)}
    missing = next((name for name in names if name not in index), None)
    if missing is not None:
        raise DatasetError(f"expected {path} to have a row for every image used, but {missing} has none")
    return _numbers(rows, path, fmt, 1, 1 + num_values)[[index[name] for name in names]]


def _counted_list(path, num_values, names):
    """The values for `names` in one of CelebA's Anno lists: the row count, a header, then '<image> v1 ... vn'."""
    fmt = f"a row count, a header line, then rows '<image> v1 ... v{num_values}'"
    lines = _lines(path, fmt)
    if not lines or not lines[0][1].isdigit():
        raise _bad(path, fmt, "its first line is not the row count")
    rows = _split(lines[2:], path, fmt, 1 + num_values)
    if int(lines[0][1]) != len(rows):
        raise _bad(path, fmt, f"its first line announces {lines[0][1]} rows and it has {len(rows)}")
    return _values_of(names, rows, path, fmt, num_values)


def _loadmat(path, fmt, keys, **options):
    import scipy.io  # lazily: only the .mat files of AFLW_R and 300W need scipy
    if not path.is_file():
        raise DatasetError(f"expected {fmt} at {path}, but there is no such file")
    try:
        mat = scipy.io.loadmat(path, **options)
    except (OSError, ValueError, TypeError, scipy.io.matlab.MatReadError) as error:
        raise _bad(path, fmt, f"it is not a readable .mat file ({error})") from None
    missing = [key for key in keys if key not in mat]
    if missing:
        raise _bad(path, fmt, f"it has no variable {missing[0]!r}")
    return mat


def _holdout(n, split, val_size, source, test_size=0):
    """Indices of `split` in a list of n items. A list of the dataset's own test images (split "test",
    test_size 0) is used whole; otherwise a HOLDOUT_SEED shuffle gives test_size items to test, the next
    val_size to val, and train keeps the rest, in file order."""
    if split == "test" and not test_size:
        return np.arange(n)
    if val_size < 0 or val_size + test_size >= n:
        sizes = f"val_size={val_size}" + (f" and test_size={test_size}" if test_size else "")
        raise DatasetError(f"{source} lists {n} images, too few to hold out {sizes}; pass smaller sizes")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    parts = {"test": order[:test_size], "val": order[test_size:test_size + val_size],
             "train": order[test_size + val_size:]}
    return np.sort(parts[split])


def _open_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:  # missing file, unknown format, truncated data
        raise DatasetError(f"expected a readable image at {path}, but it could not be read ({error})") from None


# --- The dataset every loader fills, and the face datasets ---------------------------------------------------
class _LandmarkDataset(Dataset):
    """Images with per-sample annotations, filled by a loader through _setup. Class attributes: the sample
    format's (by default faces with MAFL's 5 landmarks and the inter-ocular error) and the crop's."""

    name, mean, std, size, landmark_names = "", FACE_MEAN, FACE_STD, (96, 96), MAFL_NAMES
    eye_indices, metric, has_mask, poses_per_identity = (0, 1), "iod", False, 1
    resize, cut = (136, 136), 20  # the protocol crop: the window resized to 136x136, 20 px cut from each border
    fit = "stretch"  # without windows: the whole image ("stretch") or its centred crop of the output's shape

    def _setup(self, split, normalize, paths, keypoints, source, visible=None, identity=None, windows=None,
               sizes=None):
        """paths: N image paths (str: cheap for CelebA's 200k and for workers); keypoints (N, K, 2) source px;
        visible (N, K) (None: all); identity (N,) (None: -1); windows (N, 4) of protocol crops (left, top, width,
        height; None: whole images); sizes (N, 2) (width, height) the annotations assume, or None."""
        if len(paths) == 0:
            raise DatasetError(f"found no {split!r} images of {self.name} in {source}")
        n = len(paths)
        self.split, self.normalize, self.paths = split, normalize, [str(p) for p in paths]
        self.keypoints = np.asarray(keypoints, dtype=np.float64).reshape(n, -1, 2)
        self.visible = np.ones(self.keypoints.shape[:2], bool) if visible is None else np.asarray(visible, bool)
        self.identity = np.full(n, -1) if identity is None else np.asarray(identity, np.int64)
        self.windows = None if windows is None else np.broadcast_to(np.asarray(windows, np.float64), (n, 4))
        self.sizes = None if sizes is None else np.broadcast_to(np.asarray(sizes).round().astype(int), (n, 2))
        self.landmark_names = list(self.landmark_names)

    @property
    def num_landmarks(self):
        return len(self.landmark_names)

    def __len__(self):
        return len(self.paths)

    def _map(self, index, width, height):
        """(scale, offset) of sample `index`'s map out = scale * src + offset."""
        if self.windows is not None:
            return _window_map(*self.windows[index], self.resize, self.cut)
        out_h, out_w = self.size
        f = min(width / out_w, height / out_h) if self.fit == "crop" else None
        w, h = (out_w * f, out_h * f) if f else (width, height)
        return _window_map((width - w) / 2, (height - h) / 2, w, h, (out_w, out_h), edges=True)

    def __getitem__(self, index):
        path, image = self.paths[index], _open_rgb(self.paths[index])
        if self.sizes is not None and image.size != tuple(self.sizes[index]):
            (w, h), (actual_w, actual_h) = self.sizes[index], image.size
            raise DatasetError(f"expected {path} to be a {w}x{h} image (width x height), as its annotations "
                               f"assume, but it is {actual_w}x{actual_h}")
        scale, offset = self._map(index, *image.size)
        pixels = TF.pil_to_tensor(_resample(image, scale, offset, self.size)).float() / 255  # (3, H, W) in [0, 1]
        if self.normalize:
            pixels = TF.normalize(pixels, self.mean, self.std)
        keypoints = self.keypoints[index] * scale + offset  # (K, 2): the image's own map
        return {"image": pixels, "keypoints": torch.from_numpy(keypoints.astype(np.float32)),
                "visible": torch.from_numpy(self.visible[index].copy()),
                "identity": int(self.identity[index]), "index": int(index)}


class CelebA(_LandmarkDataset):
    """CelebA (Liu et al. 2015), the face papers' self-supervised training set; 5 landmarks in MAFL order.

    Files and crops: docs/protocol.md. train, val, test follow Eval/list_eval_partition.txt, each without the images
    of both MAFL lists (pretraining never sees an evaluation face); landmarks are used as listed (0-based, as the
    reference does); identities come from Anno/identity_CelebA.txt if it is there, else -1. wild=True reads the
    in-the-wild images with our crop (the reference has none), which puts faces at about the aligned scale.
    """

    name = "celeba"

    def __init__(self, root, split="train", normalize=True, wild=False):
        root = _folder(root, "the CelebA folder (with Img/, Anno/, Eval/ and MAFL/)", split)
        mafl = set(_mafl_names(root, "training.txt")) | set(_mafl_names(root, "testing.txt"))
        path = root / "Eval/list_eval_partition.txt"
        partition = _table(path, PARTITION_FORMAT, 2)
        bad = next(((n, part) for n, (_, part) in partition if part not in ("0", "1", "2")), None)
        if bad:
            raise _bad(path, PARTITION_FORMAT, f"line {bad[0]} has partition {bad[1]!r}")
        wanted = str(SPLIT_CODES[split])  # CelebA's codes are ours: train 0, val 1, test 2
        self.name = "celeba_wild" if wild else "celeba"
        self._load(root, split, normalize, [n for _, (n, part) in partition if part == wanted and n not in mafl],
                   wild)

    def _load(self, root, split, normalize, names, wild):
        """Look the names up in CelebA's lists (aligned or wild) and fill the per-sample arrays."""
        if wild:
            image_dir = _folder(root / "Img/img_celeba", "CelebA's in-the-wild images")
            landmark_file, box_file = root / "Anno/list_landmarks_celeba.txt", root / "Anno/list_bbox_celeba.txt"
            x, y, w, h = _counted_list(box_file, 4, names).T
            side = CELEBA_WILD_MARGIN * np.maximum(w, h)
            windows, sizes = np.stack([x + (w - side) / 2, y + (h - side) / 2, side, side], 1), None
        else:
            image_dir = next((root / "Img" / sub for sub in ("img_align_celeba", "img_align_celeba_hq")
                              if (root / "Img" / sub).is_dir()), None)
            if image_dir is None:
                raise DatasetError(f"expected CelebA's aligned images at {root / 'Img/img_align_celeba'} (or "
                                   f"img_align_celeba_hq), but there is no such folder")
            landmark_file, windows, sizes = root / "Anno/list_landmarks_align_celeba.txt", (0, 30, 178, 178), (178, 218)
        identity, identity_file = None, root / "Anno/identity_CelebA.txt"
        if identity_file.is_file():  # optional: not every copy of CelebA has it
            fmt = "rows '<image> <identity>' (CelebA's identity_CelebA.txt)"
            identity = _values_of(names, _table(identity_file, fmt, 2), identity_file, fmt, 1)[:, 0]
        self._setup(split, normalize, [image_dir / name for name in names], _counted_list(landmark_file, 10, names),
                    root, identity=identity, windows=windows, sizes=sizes)


def _mafl_names(root, list_name):
    return [fields[0] for _, fields in _table(root / "MAFL" / list_name, "one CelebA image name per row (MAFL list)")]


class MAFL(CelebA):
    """MAFL (Zhang et al. 2014): aligned CelebA's 19,000 training and 1,000 test faces, read from the CelebA folder.
    test = MAFL/testing.txt in file order (CelebA's, which the matching benchmark pairs up); val = `val_size` held
    out of training.txt, so that epochs are chosen without the test set; train = the rest."""

    name = "mafl"

    def __init__(self, root, split="train", normalize=True, val_size=1000):
        root = _folder(root, "the CelebA folder (with Img/, Anno/ and MAFL/)", split)
        list_name = "testing.txt" if split == "test" else "training.txt"
        names = _mafl_names(root, list_name)
        names = [names[i] for i in _holdout(len(names), split, val_size, root / "MAFL" / list_name)]
        self._load(root, split, normalize, names, wild=False)


class AFLW_M(_LandmarkDataset):
    """AFLW in its MTFL version (5 landmarks; docs/protocol.md): train and val (`val_size` held out) from the
    set-1 rows of aflw_cropped/facedata_cropped.csv, test from MTFL/testing.txt; 150x150 images, 1-based points."""

    name = "aflw_m"

    def __init__(self, root, split="train", normalize=True, val_size=1000):
        root = _folder(root, "the AFLW folder (with aflw_cropped/ and MTFL/)", split)
        if split == "test":
            path = root / "MTFL/testing.txt"
            rows = _table(path, MTFL_FORMAT, {11, 15})
            paths = [root / "MTFL" / fields[0].replace("\\", "/") for _, fields in rows]
            keypoints = _numbers(rows, path, MTFL_FORMAT, 1, 11).reshape(-1, 2, 5).transpose(0, 2, 1)
        else:
            path = root / "aflw_cropped/facedata_cropped.csv"
            lines = _lines(path, AFLW_CSV_FORMAT)
            header = _split(lines[:1], path, AFLW_CSV_FORMAT, sep=",")[0][1] if lines else []
            if "set" not in header or "crop_file" not in header:
                raise _bad(path, AFLW_CSV_FORMAT, f"its header is {header}")
            first = header.index("crop_file") + 1  # x1 follows crop_file
            if first + 10 > len(header):
                raise _bad(path, AFLW_CSV_FORMAT, "fewer than 10 columns follow crop_file")
            rows = _split(lines[1:], path, AFLW_CSV_FORMAT, len(header), sep=",")
            column = header.index("set")
            in_set = _numbers(rows, path, AFLW_CSV_FORMAT, column, column + 1)[:, 0] == 1
            rows = [row for row, keep in zip(rows, in_set) if keep]
            rows = [rows[i] for i in _holdout(len(rows), split, val_size, f"{path} (set 1)")]
            paths = [root / "aflw_cropped/cropped" / fields[first - 1] for _, fields in rows]
            keypoints = _numbers(rows, path, AFLW_CSV_FORMAT, first, first + 10).reshape(-1, 5, 2)
        self._setup(split, normalize, paths, keypoints - 1, path, windows=(0, 0, 150, 150), sizes=(150, 150))


class AFLW_R(_LandmarkDataset):
    """AFLW as recropped by Thewlis et al. (5 landmarks; docs/protocol.md): aflw_{train,test}_images.txt and
    aflw_{train,test}_keypoints.mat; val = `val_size` held out of train (the reference held out its last 10%)."""

    name = "aflw_r"

    def __init__(self, root, split="train", normalize=True, val_size=1000):
        root = _folder(root, "the AFLW_R folder (aflw_*_images.txt, aflw_*_keypoints.mat, output/)", split)
        subset = "test" if split == "test" else "train"
        list_path, mat_path = root / f"aflw_{subset}_images.txt", root / f"aflw_{subset}_keypoints.mat"
        names = [line for _, line in _lines(list_path, "one image path (under output/) per row")]
        mat = _loadmat(mat_path, AFLW_MAT_FORMAT, ("gt", "hw"))
        gt, hw = np.asarray(mat["gt"], np.float64), np.asarray(mat["hw"], np.float64)
        if gt.shape != (len(names), 5, 2) or hw.shape != (len(names), 2):
            raise _bad(mat_path, AFLW_MAT_FORMAT, f"gt is {gt.shape} and hw is {hw.shape} for the {len(names)} "
                                                  f"images of {list_path.name}")
        keep = _holdout(len(names), split, val_size, list_path)
        w, h = hw[keep, 1], hw[keep, 0]
        self._setup(split, normalize, [root / "output" / names[i] for i in keep], gt[keep][..., ::-1], root,
                    windows=np.stack([0 * w, 0 * h, w, h], 1), sizes=np.stack([w, h], 1))


class W300(_LandmarkDataset):
    """300W (Sagonas et al. 2013), 68 landmarks, Ren et al.'s split (docs/protocol.md: files, crop, and our one
    deviation, the exactly centred window); val = `val_size` held out of train."""

    name = "300w"
    landmark_names = W300_LANDMARKS
    eye_indices = (36, 45)  # the outer eye corners
    SUBSETS = {"train": (("afw", "afw"), ("helen_trainset", "helen/trainset"), ("lfpw_trainset", "lfpw/trainset")),
               "test": (("helen_testset", "helen/testset"), ("lfpw_testset", "lfpw/testset"), ("ibug", "ibug"))}

    def __init__(self, root, split="train", normalize=True, val_size=300):
        root = _folder(root, "the 300W folder (with 'Bounding Boxes/', afw/, helen/, lfpw/, ibug/)", split)
        paths, boxes, keypoints = [], [], []
        for subset, folder in self.SUBSETS["test" if split == "test" else "train"]:
            for name, box in _read_300w_boxes(root / f"Bounding Boxes/bounding_boxes_{subset}.mat"):
                if subset != "ibug" or name.startswith("image"):
                    paths.append(root / folder / name)
                    boxes.append(box)
                    keypoints.append(_read_pts(paths[-1].with_suffix(".pts")))
        keep = _holdout(len(paths), split, val_size, f"the 300W {split} subsets in {root}")
        xmin, ymin, xmax, ymax = np.asarray(boxes, np.float64).reshape(-1, 4)[keep].T - 1  # 0-based
        side = 100 * (xmax - xmin + 1) / 52  # the 100 px window in source pixels
        # The window's pixel 0 lies 49.5 (scaled) px before its centre, the box centre moved 2 px up.
        left, top = (xmin + xmax) / 2 - 49.5 * side / 100, (ymin + ymax) / 2 - 51.5 * side / 100
        self._setup(split, normalize, [paths[i] for i in keep], np.asarray(keypoints).reshape(-1, 68, 2)[keep] - 1,
                    root, windows=np.stack([left, top, side, side], 1))


def _read_300w_boxes(path):
    """[(image name, (xmin, ymin, xmax, ymax))] of a 'Bounding Boxes' .mat file (a cell array of structs)."""
    cells = _loadmat(path, BOXES_FORMAT, ("bounding_boxes",), simplify_cells=True)["bounding_boxes"]
    entries = []
    for cell in cells if isinstance(cells, list) else [cells]:  # one struct alone is not wrapped in a list
        if not isinstance(cell, dict) or "imgName" not in cell or "bb_ground_truth" not in cell:
            raise _bad(path, BOXES_FORMAT, f"entry {len(entries) + 1} is not such a struct")
        box = np.asarray(cell["bb_ground_truth"], np.float64).ravel()
        if box.size != 4:
            raise _bad(path, BOXES_FORMAT, f"the box of {cell['imgName']} has {box.size} numbers instead of 4")
        entries.append((str(cell["imgName"]), box))
    return entries


def _read_pts(path):
    """The 68 (x, y) points of a .pts file, as written (1-based)."""
    lines = [line for _, line in _lines(path, PTS_FORMAT)]
    if (len(lines) < 4 or not lines[0].startswith("version:") or lines[2] != "{" or lines[-1] != "}"
            or lines[1].split() != ["n_points:", "68"]):
        raise _bad(path, PTS_FORMAT, f"it starts {lines[:3]} and ends {lines[-1:]}")
    if len(lines) != 72:
        raise _bad(path, PTS_FORMAT, f"it has {len(lines) - 4} point lines")
    return _numbers(_split(enumerate(lines[3:-1], 4), path, PTS_FORMAT, 2), path, PTS_FORMAT, 0, 2)


# --- Birds, cats, and your own data --------------------------------------------------------------------------
class CUB(_LandmarkDataset):
    """CUB-200-2011 (Wah et al. 2011): 15 parts with visibility, scored by PCK (docs/protocol.md). The split:
    `split_file`, paths under images/ in its order (e.g. ContrastLandmark's Passeroidea lists; `split` then only
    names it), else train_test_split.txt with `val_size` held out of train. A hidden part's "0 0" means nothing."""

    name = "cub"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    landmark_names, eye_indices, metric = CUB_NAMES, None, "pck"  # the names of CUB's parts/parts.txt

    def __init__(self, root, split="train", normalize=True, split_file=None, val_size=500):
        root = _folder(root, "the CUB_200_2011 folder (with images.txt, parts/ and images/)", split)
        images = _table(root / "images.txt", "rows '<image id> <path under images/>'", 2)
        ids, paths = [f[0] for _, f in images], [f[1] for _, f in images]
        if split_file is not None:
            wanted = [line for _, line in _lines(Path(split_file), "paths under images/")]
            by_path = {p: i for i, p in enumerate(paths)}
            absent = next((p for p in wanted if p not in by_path), None)
            if absent is not None:
                raise DatasetError(f"expected every row of {split_file} to be a path listed in "
                                   f"{root / 'images.txt'}, but {absent!r} is not")
            keep = np.array([by_path[p] for p in wanted], dtype=np.int64)
        else:
            flags = dict(f for _, f in _table(root / "train_test_split.txt", "rows '<image id> 1|0' (1 = train)", 2))
            official = np.array([i for i, image_id in enumerate(ids)
                                 if flags.get(image_id) == ("0" if split == "test" else "1")], dtype=np.int64)
            keep = official[_holdout(len(official), split, val_size, root / "train_test_split.txt")]
        parts_path = root / "parts/part_locs.txt"
        rows = _table(parts_path, PARTS_FORMAT, 5)
        values = _numbers(rows, parts_path, PARTS_FORMAT, 1, 5)  # (rows, 4): part id, x, y, visible
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        image_rows = np.array([row_of.get(f[0], -1) for _, f in rows], dtype=np.int64)
        unknown = np.flatnonzero((image_rows < 0) | ~np.isin(values[:, 0], np.arange(1, 16)))
        if unknown.size:
            raise _bad(parts_path, PARTS_FORMAT, f"line {rows[unknown[0]][0]} names an unknown image or part")
        locations = np.full((len(ids), 15, 3), np.nan)  # (images, parts, (x, y, visible))
        locations[image_rows, values[:, 0].astype(np.int64) - 1] = values[:, 1:]
        incomplete = np.flatnonzero(np.isnan(locations).any(axis=(1, 2)))
        if incomplete.size:
            raise _bad(parts_path, PARTS_FORMAT, f"image {ids[incomplete[0]]} lacks some of the 15 parts")
        self._setup(split, normalize, [root / "images" / paths[i] for i in keep], locations[keep, :, :2], root,
                    visible=locations[keep, :, 2] == 1)


class CatHeads(_LandmarkDataset):
    """Cat heads (Zhang et al. 2008), 7 landmarks (the ear tips dropped, as Rahaman et al.). Our split: `test_size`
    and `val_size` held out, the rest train; our crop: docs/protocol.md."""

    name = "cat_heads"
    landmark_names, eye_indices, metric = CAT_LANDMARKS, None, None
    resize, cut = (96, 96), 0

    def __init__(self, root, split="train", normalize=True, val_size=1000, test_size=1000):
        root = _folder(root, "the cat heads folder (CAT_00/ ... with X.jpg and X.jpg.cat)", split)
        annotations = sorted(root.rglob("*.cat"))
        if not annotations:
            raise DatasetError(f"expected X.jpg.cat annotation files under {root}, but found none")
        points = []
        for path in annotations:
            fields = " ".join(line for _, line in _lines(path, CAT_FORMAT)).split()
            if len(fields) != 19 or fields[0] != "9":
                raise _bad(path, CAT_FORMAT, f"it has {len(fields)} fields starting {fields[:1]}")
            points.append(_numbers([(1, fields)], path, CAT_FORMAT, 1, 19).reshape(9, 2))
        keep = _holdout(len(annotations), split, val_size, f"{root} (*.cat files)", test_size)
        points = np.asarray(points)[keep]  # (N, 9, 2)
        (x0, y0), (x1, y1) = points.min(axis=1).T, points.max(axis=1).T
        side = CAT_MARGIN * np.maximum(x1 - x0, y1 - y0)
        self._setup(split, normalize, [annotations[i].with_suffix("") for i in keep], points[:, CAT_KEEP], root,
                    windows=np.stack([(x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side, side], 1))


class CSVKeypoints(_LandmarkDataset):
    """Images with points in CSV rows (e.g. BBC Pose, or your own): `root` is a folder of train.csv, val.csv and
    test.csv, or one .csv for every split. A row: the image path (relative to the CSV), then x, y (with
    `with_visible`: x, y, visible) per landmark in 0-based pixels. An optional header (second field not a number)
    names the landmarks by their x columns ("head_x" -> "head"). The whole image -> `size`, edges on edges."""

    name = "csv"

    def __init__(self, root, split="train", normalize=True, size=96, with_visible=False, landmark_names=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, eye_indices=None, metric=None):
        _check_split(split)
        path = Path(root).expanduser()
        if path.suffix != ".csv":
            path = _folder(path, "a folder of split CSVs") / f"{split}.csv"
        per = 3 if with_visible else 2
        fmt = f"CSV rows 'image,{'x,y,visible' if with_visible else 'x,y'},...' (one per landmark)"
        rows = _split(_lines(path, fmt), path, fmt, sep=",")
        header = None
        if rows and len(rows[0][1]) > 1 and not _is_number(rows[0][1][1]):
            header, rows = rows[0][1], rows[1:]
        if not rows:
            raise _bad(path, fmt, "it has no data rows")
        columns = len(rows[0][1])
        if (columns - 1) % per or (header is not None and len(header) != columns):
            raise _bad(path, fmt, f"line {rows[0][0]} has {columns} columns")
        number, fields = next(((n, f) for n, f in rows if len(f) != columns), (0, None))
        if fields is not None:
            raise _bad(path, fmt, f"line {number} has {len(fields)} columns instead of {columns}")
        k = (columns - 1) // per
        values = _numbers(rows, path, fmt, 1, columns).reshape(-1, k, per)
        if landmark_names is None:
            landmark_names = ([header[1 + per * i].removesuffix("_x") for i in range(k)] if header
                              else [f"point {i}" for i in range(k)])
        if len(landmark_names) != k:
            raise ValueError(f"landmark_names has {len(landmark_names)} names for {k} landmarks")
        self.landmark_names, self.size = landmark_names, (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std, self.eye_indices, self.metric = mean, std, eye_indices, metric
        self._setup(split, normalize, [path.parent / f[0] for _, f in rows], values[..., :2], path,
                    visible=values[..., 2] == 1 if with_visible else None)


class ImageFolderUnlabelled(_LandmarkDataset):
    """Unlabelled images (K = 0), e.g. iNaturalist Aves: a folder, searched recursively, or a text file of paths.
    No test split; val = `val_size` held out. Each image is centre-cropped to the aspect of `size` and resized."""

    name = "image_folder"
    mean, std, landmark_names, eye_indices, metric = IMAGENET_MEAN, IMAGENET_STD, (), None, None
    fit = "crop"

    def __init__(self, root, split="train", normalize=True, size=96, val_size=0, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        _check_split(split)
        if split == "test":
            raise ValueError("an unlabelled image folder has no test split; use 'train' or 'val'")
        if split == "val" and not val_size:
            raise ValueError("the val split of an image folder needs val_size > 0")
        root = Path(root).expanduser()
        if root.is_file():
            paths = [root.parent / line for _, line in _lines(root, "one image path per row")]
        else:
            paths = sorted(p for p in _folder(root, "a folder of images").rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise DatasetError(f"expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}, but found none")
        paths = [paths[i] for i in _holdout(len(paths), split, val_size, root)]
        self.size, self.mean, self.std = (size, size) if isinstance(size, int) else tuple(size), mean, std
        self._setup(split, normalize, paths, np.zeros((len(paths), 0, 2)), root)


# =========================================================================================================
# 4. Warps that move images and points together
#
# Thin-plate spline (TPS), affine and elastic warps, one per sample of a batch, in the normalised coordinates of
# docs/protocol.md (section 1). backward(u), output -> input, is the sampling map; grid(H, W) is backward at every
# output pixel, what grid_sample needs; forward(x), input -> output, is where a landmark lands (never clamped).
# `a.then(b)` is "first a, then b". Random parameters are drawn in float32 on the generator's device, so a seed
# gives the same warps on every device and dtype; nothing reads a tensor's value on the host, so a GPU never waits.
# =========================================================================================================
def _hw(size):
    """(H, W) from an int or a pair; at least 2 pixels per side (normalising divides by W - 1)."""
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if H < 2 or W < 2:
        raise ValueError(f"Image size must be at least 2x2 pixels, got {H}x{W}.")
    return H, W


def to_normalised(points_px, size):
    """Pixel (x, y), centres at integers -> normalised [-1, 1] coordinates."""
    H, W = _hw(size)
    x, y = points_px.unbind(-1)
    return torch.stack((x * (2.0 / (W - 1)), y * (2.0 / (H - 1))), dim=-1) - 1.0


def to_pixels(points, size):
    """Inverse of ``to_normalised``."""
    H, W = _hw(size)
    x, y = (points + 1.0).unbind(-1)
    return torch.stack((x * ((W - 1) / 2.0), y * ((H - 1) / 2.0)), dim=-1)


def in_frame(points_px, size, margin=0.0):
    """Bool (..., K): the pixel point lies on the image, within [-0.5, W - 0.5] x [-0.5, H - 0.5] (the pixel
    squares around integer centres) shrunk by ``margin`` pixels; False for NaN."""
    H, W = _hw(size)
    x, y = points_px.unbind(-1)
    return (x >= margin - 0.5) & (y >= margin - 0.5) & (x <= W - 0.5 - margin) & (y <= H - 0.5 - margin)


def identity_grid(H, W, device="cpu", dtype=torch.float32):
    """(H, W, 2) normalised (x, y) of every pixel centre: the sampling grid of the identity warp."""
    xs, ys = (torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in (W, H))
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def _draw(sampler, generator, *shape):
    """torch.randn or torch.rand numbers in float32 on the generator's device (the CPU when None)."""
    return sampler(*shape, generator=generator, device=generator.device if generator is not None else "cpu")


def _on(tensor, device, dtype):
    """Move drawn parameters to `device`; to a GPU from pinned memory without blocking, so the host goes on."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


class Warp:
    """A batch of ``n`` warps. Subclasses define ``backward`` and its Jacobian ``jacobian(uv)`` (N, P, 2, 2),
    J[..., i, j] = d backward_i / d u_j, with which ``forward`` inverts ``backward`` by Newton's method."""

    newton_steps = 20  # enough for a double root at the edge of a fold, where each step only halves the error

    def __init__(self, n, device, dtype):
        self.n, self.device, self.dtype = int(n), torch.device(device), dtype

    def forward(self, xy):
        """(N, P, 2) input -> output coordinates: solves backward(u) = xy from two starts per point. When several
        u solve it (a folded TPS), the one inside the output frame wins (where the point is seen); NaN when
        none does."""
        P = xy.shape[1]
        u = self._newton(xy.repeat(1, 2, 1), self._initial_guesses(xy))  # (N, 2P, 2)
        from_inside, from_anywhere = u[:, :P], u[:, P:]
        visible = (from_inside.abs() <= 1.0).all(-1, keepdim=True)  # False for NaN
        return torch.where(visible | from_anywhere.isnan(), from_inside, from_anywhere)

    def grid(self, H, W):
        """(N, H, W, 2) sampling grid: for every output pixel, its normalised location in the input."""
        return self._lattice(H, W, 1.0)

    def then(self, other):
        """The composed warp "first self, then other"."""
        return ComposedWarp([self, other])

    def _lattice(self, H, W, extent):
        """(N, H, W, 2) backward map on an H x W lattice of output coordinates spanning [-extent, extent]^2."""
        uv = (identity_grid(H, W, self.device, self.dtype) * extent).reshape(1, H * W, 2)
        return self.backward(uv.expand(self.n, -1, -1)).reshape(self.n, H, W, 2)

    def _initial_guesses(self, xy, size=25, extent=1.5):
        """(N, 2P, 2) Newton starts: the node of a size x size lattice over [-extent, extent]^2 (6 px apart at
        96 px) whose backward image is nearest to xy, among the nodes inside the frame (first P) and among all."""
        nodes = (identity_grid(size, size, self.device, self.dtype) * extent).reshape(-1, 2)  # (S, 2)
        outside = (nodes.abs() > 1.0).any(-1)  # (S,): a fixed mask, not a data-dependent index list
        images = self._lattice(size, size, extent).reshape(self.n, -1, 2)  # (N, S, 2)
        chunk = max(1, 2 ** 22 // (self.n * nodes.shape[0]))  # bounds the (N, chunk, S) distance matrix
        best_in, best_any = [], []
        for part in xy.split(chunk, dim=1):
            dist = torch.cdist(part, images)  # (N, chunk, S)
            best_any.append(dist.argmin(-1))
            best_in.append(dist.masked_fill(outside, float("inf")).argmin(-1))
        return nodes[torch.cat(best_in + best_any, dim=1)]

    def _newton(self, xy, u):
        """Damped Newton's method for backward(u) = xy: u <- u - t J(u)^-1 (backward(u) - xy), t the first of
        1, 1/2, 1/4, 1/8 that lowers the residual. A point stops at a residual of 1e-6 (float32) or 1e-12
        (float64), or after gaining less than 25% three times far from any root (it circles a fold with no
        solution); all ``newton_steps`` run as masked updates, so nothing is read on the host. NaN where the
        residual stays above 1e-4."""
        tol = 1e-12 if xy.dtype == torch.float64 else 1e-6
        t = 0.5 ** torch.arange(4, device=u.device, dtype=u.dtype)  # (4,) step lengths
        r = self.backward(u) - xy  # residual: (N, P, 2)
        err = r.norm(dim=-1)  # (N, P)
        weak_steps = torch.zeros_like(err)  # per point: steps that gained less than 25%
        for _ in range(self.newton_steps):
            active = (err > tol) & (weak_steps < 3)
            J = self.jacobian(u)  # (N, P, 2, 2)
            a, b, c, d = J[..., 0, 0], J[..., 0, 1], J[..., 1, 0], J[..., 1, 1]
            # Closed-form 2x2 solve of J step = r (cheaper than linalg.solve, and runs on every backend).
            step = torch.stack((d * r[..., 0] - b * r[..., 1], a * r[..., 1] - c * r[..., 0]), dim=-1)
            step = step / (a * d - b * c).unsqueeze(-1)
            tries = u.unsqueeze(2) - t[:, None] * step.unsqueeze(2)  # (N, P, 4, 2)
            r_tries = self.backward(tries.flatten(1, 2)).unflatten(1, (-1, 4)) - xy.unsqueeze(2)
            lower = r_tries.norm(dim=-1) < err.unsqueeze(-1)  # (N, P, 4); False for NaN (a singular J)
            pick = torch.where(lower.any(-1), lower.int().argmax(-1), 3)[..., None, None].expand(-1, -1, 1, 2)
            u_new, r_new = tries.gather(2, pick).squeeze(2), r_tries.gather(2, pick).squeeze(2)
            err_new = r_new.norm(dim=-1)
            weak_steps += active & (err > 1e-4) & ~(err_new < 0.75 * err)
            better = (active & (err_new < err)).unsqueeze(-1)
            u, r = torch.where(better, u_new, u), torch.where(better, r_new, r)
            err = r.norm(dim=-1)
        return torch.where((err <= 1e-4).unsqueeze(-1), u, torch.full_like(u, float("nan")))


# --- Thin-plate spline (DVE's parameterisation) --------------------------------------------------------------
TPS_PRESETS = {  # standard deviations of the random parameters (see random_tps); shifts in normalised units
    "pair": dict(sd_all=1e-3, sd_subset=1e-2, trans_sd=0.1, scale_sd=0.1, rot_sd=5.0),  # training pairs
    "match": dict(sd_all=5e-4, sd_subset=5e-3, trans_sd=0.05, scale_sd=0.05, rot_sd=2.5),  # matching: "pair" / 2
    "single": dict(sd_all=5e-4, sd_subset=0.0, trans_sd=0.02, scale_sd=0.02, rot_sd=2.0),  # few-shot augmentation
}
_TPS_EPS = 1e-5  # inside the log of U(D) = D log(D + eps): makes U(0) = 0 instead of 0 * -inf


@functools.lru_cache(maxsize=16)
def _tps_controls(device, dtype):
    """(100, 2) control points: a 10x10 grid over [-1, 1]^2, x varying fastest (DVE's order)."""
    return identity_grid(10, 10, device, dtype).reshape(100, 2)


def _tps_sq_dist(uv, controls):
    """(..., P, 100) squared distances |u - c_k|^2 = |u|^2 - 2 u.c_k + |c_k|^2 (one matmul), clamped at 0."""
    return (uv.pow(2).sum(-1, keepdim=True) - 2.0 * uv @ controls.T + controls.pow(2).sum(-1)).clamp_min(0.0)


@functools.lru_cache(maxsize=16)
def _tps_lattice_features(H, W, extent, device, dtype):
    """(H*W, 103) rows [U(|u - c_1|^2) .. U(|u - c_100|^2) | 1 | x | y] of a lattice's nodes u, cached."""
    uv = identity_grid(H, W, device, dtype).reshape(H * W, 2) * extent
    D = _tps_sq_dist(uv, _tps_controls(device, dtype))  # (H*W, 100)
    return torch.cat((D * torch.log(D + _TPS_EPS), torch.ones_like(uv[:, :1]), uv), dim=1)


class TPSWarp(Warp):
    """DVE's TPS (docs/protocol.md, section 5): backward(u) = [U(|u - c_1|^2) ... U(|u - c_100|^2) | 1 | x | y]
    @ weights; ``weights`` (N, 103, 2): 100 non-rigid rows, the shift, the linear part."""

    def __init__(self, weights):
        if weights.dim() != 3 or weights.shape[1:] != (103, 2):
            raise ValueError(f"TPS weights must have shape (N, 103, 2), got {tuple(weights.shape)}.")
        super().__init__(weights.shape[0], weights.device, weights.dtype)
        self.weights = weights
        self.controls = _tps_controls(self.device, self.dtype)

    def backward(self, uv):
        D = _tps_sq_dist(uv, self.controls)  # (N, P, 100)
        W = self.weights
        return (D * torch.log(D + _TPS_EPS)) @ W[:, :100] + W[:, 100:101] + uv @ W[:, 101:]

    def jacobian(self, uv):
        # d U(D_k) / d u_j = U'(D_k) 2 (u_j - c_kj), U'(D) = log(D + eps) + D / (D + eps), so
        # J_ij = 2 (u_j s_i - M_ij) + W[101 + j, i], s_i = sum_k U'_k W_ki, M_ij = sum_k U'_k W_ki c_kj.
        D = _tps_sq_dist(uv, self.controls)
        dU = torch.log(D + _TPS_EPS) + D / (D + _TPS_EPS)  # (N, P, 100)
        s = dU @ self.weights[:, :100]  # (N, P, 2)
        M = torch.einsum("npk,nki,kj->npij", dU, self.weights[:, :100], self.controls)  # (N, P, 2, 2)
        return 2.0 * (s.unsqueeze(-1) * uv.unsqueeze(-2) - M) + self.weights[:, 101:].transpose(1, 2).unsqueeze(1)

    def _lattice(self, H, W, extent):
        feats = _tps_lattice_features(H, W, extent, self.device, self.dtype)  # (H*W, 103), cached
        return torch.einsum("pk,nkc->npc", feats, self.weights).reshape(self.n, H, W, 2)


def random_tps(n, preset="pair", generator=None, device="cpu", dtype=torch.float32, nonrigid_scale=1.0):
    """N random TPS warps as DVE draws them (docs/protocol.md, section 5), with the sds of ``TPS_PRESETS[preset]``,
    the non-rigid ones times ``nonrigid_scale`` (DVE's im1_multiplier)."""
    if preset not in TPS_PRESETS:
        raise ValueError(f"TPS preset must be one of {sorted(TPS_PRESETS)}, got {preset!r}.")
    p = TPS_PRESETS[preset]
    nonrigid = _draw(torch.randn, generator, n, 100, 2) * (nonrigid_scale * p["sd_all"])
    redrawn = _draw(torch.randn, generator, n, 100, 2) * (nonrigid_scale * p["sd_subset"])
    nonrigid = torch.where(_draw(torch.rand, generator, n, 100, 2) < 0.5, redrawn, nonrigid)
    rot = _draw(torch.randn, generator, n) * (p["rot_sd"] * math.pi / 180.0)
    scale = 1.0 + _draw(torch.randn, generator, n) * p["scale_sd"]
    trans = _draw(torch.randn, generator, n, 2) * p["trans_sd"]
    cos, sin = scale * torch.cos(rot), scale * torch.sin(rot)
    affine = torch.stack((trans, torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), dim=1)  # (n, 3, 2)
    return TPSWarp(_on(torch.cat((nonrigid, affine), dim=1), device, dtype))


class TPSPair(NamedTuple):
    """image1 (N, C, H, W) = the input warped by warp1; image2 = image1 warped by warp12, whose grid(H, W) gives
    every pixel of image 2 its location in image 1 (DVE's ``grid``); points1, points2 (N, K, 2) or None."""
    image1: torch.Tensor
    image2: torch.Tensor
    points1: Optional[torch.Tensor]
    points2: Optional[torch.Tensor]
    warp1: TPSWarp
    warp12: TPSWarp


def tps_training_pair(images, points=None, generator=None, preset="pair"):
    """Two TPS views of each image as DVE makes them (docs/protocol.md, section 5; "match": both draws unscaled).
    Image 2 is resampled from image 1, so what left image 1 stays empty in image 2. ``points``: optional
    (N, K, 2) pixel points of ``images``."""
    if preset not in ("pair", "match"):
        raise ValueError(f"tps_training_pair preset must be 'pair' or 'match', got {preset!r}.")
    n, _, H, W = images.shape
    kw = dict(generator=generator, device=images.device,
              dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)
    warp1 = random_tps(n, preset, nonrigid_scale=0.5 if preset == "pair" else 1.0, **kw)
    warp12 = random_tps(n, preset, **kw)
    image1 = warp_images(images, warp1)
    points1 = None if points is None else warp_points(points, warp1, (H, W))
    points2 = None if points is None else warp_points(points1, warp12, (H, W))
    return TPSPair(image1, warp_images(image1, warp12), points1, points2, warp1, warp12)


# --- Affine and elastic warps --------------------------------------------------------------------------------
def _invert_affine(theta):
    """(N, 2, 3) [A | t] of x -> A x + t  ->  [A^-1 | -A^-1 t], in closed form."""
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    inv = torch.stack((torch.stack((d, -b), -1), torch.stack((-c, a), -1)), dim=1) / (a * d - b * c)[:, None, None]
    return torch.cat((inv, -inv @ theta[:, :, 2:]), dim=2)


class AffineWarp(Warp):
    """backward(u) = A u + t, ``theta`` = [A | t] (N, 2, 3), the matrix ``F.affine_grid`` takes (output ->
    input)."""

    def __init__(self, theta):
        if theta.dim() != 3 or theta.shape[1:] != (2, 3):
            raise ValueError(f"Affine theta must have shape (N, 2, 3), got {tuple(theta.shape)}.")
        super().__init__(theta.shape[0], theta.device, theta.dtype)
        self.theta = theta

    def backward(self, uv):
        return uv @ self.theta[:, :, :2].transpose(1, 2) + self.theta[:, None, :, 2]  # u A^T + t

    def jacobian(self, uv):
        return self.theta[:, None, :, :2].expand(*uv.shape[:2], 2, 2)

    def forward(self, xy):
        inv = _invert_affine(self.theta)  # exact: no iterations needed
        return xy @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2]


def random_affine(n, rotation_deg=10.0, scale=(0.9, 1.1), translation=0.1, generator=None, device="cpu",
                  dtype=torch.float32):
    """N random similarity warps, described by how they move the content (x -> s R x + t): rotation uniform in
    +-rotation_deg degrees (positive = clockwise on screen, y points down), scale log-uniform in ``scale``
    (s < 1 shrinks the object), shift uniform in +-translation per axis (normalised: 0.1 = 5% of the width)."""
    u = _draw(torch.rand, generator, n, 4)
    angle = (2.0 * u[:, 0] - 1.0) * rotation_deg * math.pi / 180.0
    s = torch.exp(math.log(scale[0]) + u[:, 1] * (math.log(scale[1]) - math.log(scale[0])))
    t = (2.0 * u[:, 2:] - 1.0) * translation  # (n, 2)
    cos, sin = s * torch.cos(angle), s * torch.sin(angle)
    matrix = torch.stack((torch.stack((cos, -sin, t[:, 0]), -1), torch.stack((sin, cos, t[:, 1]), -1)), dim=1)
    return AffineWarp(_invert_affine(_on(matrix, device, dtype)))  # backward is the inverse of x -> s R x + t


def zoom_out(n, factor, device="cpu", dtype=torch.float32):
    """Affine warps that shrink the content about the image centre by ``factor`` (a number or an (n,) CPU
    tensor): 2 makes the object half as large (the border fills with zeros), 1 is the identity, 0.5 zooms in."""
    theta = torch.zeros(n, 2, 3, dtype=dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.as_tensor(factor, dtype=theta.dtype)  # backward: u -> factor u
    return AffineWarp(_on(theta, device, dtype))


class ElasticWarp(Warp):
    """backward(u) = u + d(u), d_c(x, y) = sum_ij weights[c, i, j] g(y - cy_i) g(x - cx_j), g(s) = exp(-s^2 /
    (2 sigma^2)): Gaussian-smoothed impulses on a lattice, separable in x and y, exact at any point and with an
    analytic Jacobian. ``weights`` (N, 2, ny, nx): channel 0 moves x, 1 moves y; ``centres_x`` (nx,),
    ``centres_y`` (ny,)."""

    newton_steps = 10  # from the start x - d(x), even |grad d| = 0.99 converged in 9 steps

    def __init__(self, weights, sigma, centres_x, centres_y):
        super().__init__(weights.shape[0], weights.device, weights.dtype)
        self.weights, self.sigma = weights, float(sigma)
        self.centres_x, self.centres_y = centres_x, centres_y

    def _bumps(self, s, centres):
        """g and g' at coordinates s (...,) for every centre: (..., len(centres)) each. g is 0 beyond 8 sigma
        (below 1e-14): its float32 tail would be denormal numbers, which make the products ~20x slower."""
        diff = s.unsqueeze(-1) - centres
        z2 = (diff / self.sigma) ** 2
        g = torch.where(z2 < 64.0, torch.exp(-0.5 * z2), torch.zeros_like(z2))
        return g, -diff / self.sigma ** 2 * g

    def _at_points(self, gy, gx):
        """(N, P, 2) sum_ij weights[:, c, i, j] gy[:, p, i] gx[:, p, j], from (N, P, ny) and (N, P, nx)."""
        return torch.einsum("ncij,npi,npj->npc", self.weights, gy, gx)

    def backward(self, uv):
        gx, _ = self._bumps(uv[..., 0], self.centres_x)  # (N, P, nx)
        gy, _ = self._bumps(uv[..., 1], self.centres_y)  # (N, P, ny)
        return uv + self._at_points(gy, gx)

    def forward(self, xy):
        # u + d(u) is one-to-one (d is a contraction, see random_elastic): one start, x - d(x), suffices.
        return self._newton(xy, 2 * xy - self.backward(xy))

    def jacobian(self, uv):
        gx, dgx = self._bumps(uv[..., 0], self.centres_x)
        gy, dgy = self._bumps(uv[..., 1], self.centres_y)
        d_dx, d_dy = self._at_points(gy, dgx), self._at_points(dgy, gx)  # (N, P, 2) each: d d_c / d x, d y
        return torch.stack((d_dx, d_dy), dim=-1) + torch.eye(2, dtype=uv.dtype, device=uv.device)

    def _field(self, ys, xs, dy=False, dx=False):
        """(N, 2, len(ys), len(xs)) displacement (or a derivative) on a tensor grid, by separable matmuls."""
        gx = self._bumps(xs, self.centres_x)[int(dx)]  # (W, nx)
        gy = self._bumps(ys, self.centres_y)[int(dy)]  # (H, ny)
        return torch.einsum("ncij,yi,xj->ncyx", self.weights, gy, gx)

    def _lattice(self, H, W, extent):
        base = identity_grid(H, W, self.device, self.dtype) * extent
        return base + self._field(base[:, 0, 1], base[0, :, 0]).permute(0, 2, 3, 1)


def random_elastic(n, alpha=0.05, sigma=0.2, max_grad=0.5, generator=None, device="cpu", dtype=torch.float32):
    """N random elastic warps: white noise on a lattice of spacing sigma / 2, smoothed by a Gaussian of width
    ``sigma`` (normalised; 0.2 ~ 10 px at 96 px). ``alpha``: rms displacement per axis (0.05 ~ 2.4 px at 96 px);
    the displacement gradient is then ~alpha / sigma. A sample whose |grad d| (Frobenius norm, a bound of the
    spectral norm) exceeds ``max_grad`` < 1 anywhere is scaled down to it: then d is a contraction and
    u -> u + d(u) one-to-one and onto, so ``forward`` always succeeds."""
    if not 0.0 < max_grad < 1.0:
        raise ValueError(f"max_grad must be in (0, 1) for the elastic warp to be invertible, got {max_grad}.")
    # The lattice reaches 3 sigma beyond the frame, so the field is as strong at the border as in the middle;
    # with white noise w on it, Var d = c^2 sum_k g_k^2 ~ c^2 pi sigma^2 / h^2 sets c.
    h = sigma / 2.0
    m = math.ceil((1.0 + 3.0 * sigma) / h)
    centres = torch.arange(-m, m + 1, device=device, dtype=dtype) * h
    c = alpha * h / (sigma * math.sqrt(math.pi))
    weights = _on(_draw(torch.randn, generator, n, 2, 2 * m + 1, 2 * m + 1) * c, device, dtype)
    warp = ElasticWarp(weights, sigma, centres, centres)
    # The largest gradient on a grid of 4 points per sigma (the field varies on the scale sigma).
    s = torch.linspace(-m * h, m * h, 4 * m + 1, device=device, dtype=dtype)
    grad_sq = warp._field(s, s, dx=True).pow(2) + warp._field(s, s, dy=True).pow(2)  # (N, 2, S, S)
    worst = grad_sq.sum(1).flatten(1).amax(1).sqrt()  # (N,) Frobenius norm of grad d at its largest
    warp.weights = weights * (max_grad / worst).clamp(max=1.0)[:, None, None, None]
    return warp


# --- Composition, and applying warps to images and points ----------------------------------------------------
class ComposedWarp(Warp):
    """``warps[0]``, then ``warps[1]``, ...: forward applies them in order (each exactly), backward in reverse.
    Only the last warp's dense grid has a fast path: with a TPS or elastic warp before the last, ``grid`` takes
    ~0.1 s for 32 images of 96x96 on one core."""

    def __init__(self, warps):
        flat = [w for warp in warps for w in (warp.warps if isinstance(warp, ComposedWarp) else [warp])]
        if len({w.n for w in flat}) != 1:
            raise ValueError(f"Composed warps must have the same batch size, got {[w.n for w in flat]}.")
        super().__init__(flat[0].n, flat[0].device, flat[0].dtype)
        self.warps = flat

    def backward(self, uv):
        for w in reversed(self.warps):
            uv = w.backward(uv)
        return uv

    def forward(self, xy):
        for w in self.warps:
            xy = w.forward(xy)
        return xy

    def _lattice(self, H, W, extent):
        g = self.warps[-1]._lattice(H, W, extent).reshape(self.n, H * W, 2)  # fast path of the last warp
        chunk = max(1, 1024 // self.n)  # pieces whose (N, chunk, 100) TPS temporaries stay in cache: 4x faster
        for w in reversed(self.warps[:-1]):
            parts = [g] if isinstance(w, AffineWarp) else g.split(chunk, dim=1)  # affine: no temporaries
            g = torch.cat([w.backward(part) for part in parts], dim=1)
        return g.reshape(self.n, H, W, 2)


def warp_images(images, warp):
    """(N, C, H, W) -> (N, C, H, W): bilinear ``grid_sample`` of ``warp.grid(H, W)``; pixels whose source lies
    outside the input are 0."""
    if images.dim() != 4 or images.shape[0] != warp.n:
        raise ValueError(f"Expected images (N={warp.n}, C, H, W) matching the warp batch, got {tuple(images.shape)}.")
    grid = warp.grid(images.shape[2], images.shape[3]).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def warp_points(points_px, warp, size):
    """(N, K, 2) pixel points of the input image -> (N, K, 2) pixel points of the output image: the exact
    forward map, not clamped (``in_frame`` finds points that left the frame). ``size``: (H, W) or int."""
    if points_px.dim() != 3 or points_px.shape[0] != warp.n or points_px.shape[2] != 2:
        raise ValueError(f"Expected points (N={warp.n}, K, 2) in pixels, got {tuple(points_px.shape)}.")
    out_dtype = points_px.dtype if points_px.is_floating_point() else warp.dtype
    uv = warp.forward(to_normalised(points_px.to(warp.dtype), size))
    return to_pixels(uv, size).to(out_dtype)


# =========================================================================================================
# 5. Datasets by name (every script's --dataset flag)
# =========================================================================================================
DATASETS = {  # name: (class, its keyword arguments, what it is; --data-root is the folder the class reads)
    "synth-faces": (SyntheticFaces, {}, "built-in aligned faces, 5 MAFL-style landmarks (default; needs no files)"),
    "synth-faces-dense": (SyntheticFaces, dict(annotation="dense"), "built-in aligned faces, dense annotation"),
    "synth-faces-wild": (SyntheticFaces, dict(variant="wild"), "built-in faces in the wild: scale, rotation, "
                         "clutter, occluders"),
    "synth-faces-wild-dense": (SyntheticFaces, dict(variant="wild", annotation="dense"), "the same, dense"),
    "synth-faces-clutter": (SyntheticFaces, dict(variant="clutter"), "the aligned faces of synth-faces in the wild "
                            "variant's cluttered scenes"),
    "synth-birds": (SyntheticBirds, {}, "built-in birds, the 15 CUB parts with visibility"),
    "celeba": (CelebA, {}, "CelebA aligned, the self-supervised split (MAFL's images removed)"),
    "celeba-wild": (CelebA, dict(wild=True), "CelebA in the wild (Img/img_celeba and the face boxes)"),
    "mafl": (MAFL, {}, "MAFL, 5 landmarks, read from the CelebA folder"),
    "aflw-m": (AFLW_M, {}, "AFLW as cropped for MTFL (a folder with MTFL/ and aflw_cropped/)"),
    "aflw-r": (AFLW_R, {}, "AFLW as recropped by Thewlis et al. (output/ and the .mat files)"),
    "300w": (W300, {}, "300W, 68 landmarks ('Bounding Boxes/', afw/, helen/, lfpw/, ibug/)"),
    "cub": (CUB, {}, "CUB-200-2011, 15 parts (the CUB_200_2011 folder; split lists with split_file)"),
    "folder": (ImageFolderUnlabelled, {}, "any folder of images (or a text list of paths), unlabelled"),
    "cats": (CatHeads, {}, "cat heads (Zhang et al. 2008), X.jpg with X.jpg.cat, 7 landmarks"),
    "csv": (CSVKeypoints, {}, "'image,x1,y1,...' CSV rows (a file, or a folder of train/val/test.csv)"),
}


def make_dataset(name, split="train", root=None, size=96, normalize=True, **kwargs):
    """The dataset called `name` (one of DATASETS) for `split` ("train", "val" or "test"). `root`: its folder on
    disk (not for the built-in data); other keyword arguments go to its class (e.g. ``length`` for the built-in
    data, ``split_file`` for CUB). Only the built-in data, CSV files and image folders take another size than
    the 96x96 of the reference preprocessing."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    cls, preset, _ = DATASETS[name]
    kwargs.update(preset, split=split, normalize=normalize)
    if name.startswith("synth-"):
        return cls(size=size, **kwargs)
    if root is None:
        raise DatasetError(f"dataset {name!r} is read from disk: pass its folder with --data-root")
    if cls in (CSVKeypoints, ImageFolderUnlabelled):
        return cls(root, size=size, **kwargs)
    if size != 96:
        raise DatasetError(f"dataset {name!r} follows the reference preprocessing to 96x96 images; got "
                           f"--image-size {size}")
    return cls(root, **kwargs)


# =========================================================================================================
# 6. The exported feature-extractor contract
#
# A method hands its frozen dense features to regress.py / match.py as ONE torch.export file (no pickled Python
# classes, so the evaluation never imports a method file). It takes RGB images in [0, 1], (B, 3, H, W) with a
# dynamic batch, normalises them itself and returns (B, C, h, w). Its meta.json says: input_size [H, W]; kind,
# "features" or "heatmaps" (each channel a spatial distribution, e.g. discovered landmarks); channels C;
# channel_groups [[name, start, stop], ...] (e.g. a hypercolumn's layers); mean and std (baked inside); method
# and variant (free text). The evaluation puts cell (0, 0) on pixel (0, 0)'s centre and cell (h-1, w-1) on
# pixel (H-1, W-1)'s (align_corners=True); a plain strided CNN map is off by up to half a stride from this.
# =========================================================================================================
_REQUIRED_META = ("input_size", "kind", "channels", "channel_groups", "method", "variant")


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that an exported extractor can take images in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def save_extractor(module, path, meta, mean, std):
    """Export `module` (normalised images -> (B, C, h, w)) behind `Normalize(mean, std)`, in eval mode, as an
    extractor of [0, 1] images. `meta` needs the keys above but channels, mean and std, which are filled in
    (channel_groups defaults to one group). Returns the completed meta dict."""
    meta = dict(meta)
    missing = [k for k in ("input_size", "kind", "method", "variant") if k not in meta]
    if missing:
        raise ValueError(f"extractor meta lacks {missing}")
    if meta["kind"] not in ("features", "heatmaps"):
        raise ValueError(f"meta['kind'] must be 'features' or 'heatmaps', not {meta['kind']!r}")
    height, width = meta["input_size"]
    model = nn.Sequential(Normalize(mean, std), module).eval()
    device = next(model.parameters(), model[0].mean).device
    # batch 2: torch.export specialises dimensions of size 0 and 1, so an example of 2 keeps it dynamic
    example_input = torch.rand(2, 3, height, width, device=device)
    with torch.no_grad():
        out = model(example_input)
    channels = out.shape[1]
    meta.update(channels=channels, mean=list(mean), std=list(std), output_size=list(out.shape[2:]))
    meta.setdefault("channel_groups", [["all", 0, channels]])
    if meta["channel_groups"][-1][2] != channels:
        raise ValueError(f"channel_groups {meta['channel_groups']} do not cover the {channels} channels")
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example_input,), dynamic_shapes=({0: batch},))
    tmp = f"{os.path.splitext(path)[0]}.tmp.pt2"  # torch.export wants the .pt2 ending
    torch.export.save(program, tmp, extra_files={"meta.json": json.dumps(meta)})
    os.replace(tmp, path)  # atomic: a half-written file never carries the final name
    return meta


class Extractor:
    """A loaded extractor: ``extractor(images_in_0_1) -> (B, C, h, w)``, with ``.meta`` and ``.module``."""

    def __init__(self, module, meta, device):
        self.module, self.meta, self.device = module, meta, torch.device(device)

    def __call__(self, images):
        height, width = self.meta["input_size"]
        if tuple(images.shape[-2:]) != (height, width):
            raise ValueError(f"this extractor was exported for {height}x{width} images, "
                             f"got {tuple(images.shape[-2:])}; use --image-size {height}")
        return self.module(images.to(self.device, non_blocking=True))

    def state_fingerprint(self):
        """A hash per parameter/buffer: lets an evaluation assert that it did not change the extractor."""
        return {k: hashlib.sha1(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                for k, v in self.module.state_dict().items()}


def on_device(module, device):
    """Rewrite every device that an exported graph records to `device`. torch.export records the export's device
    in a check before each `.float()` and similar cast (and in ops such as arange), so moving the weights alone
    leaves an extractor exported on the CPU failing at its first call on a GPU. The weights are moved apart."""
    device = torch.device(device)
    swap = lambda a: device if isinstance(a, torch.device) else a  # noqa: E731
    for node in module.graph.nodes:
        node.args = tuple(swap(a) for a in node.args)
        node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    module.recompile()
    return module


def load_extractor(path, device="cpu"):
    """Load a file written by `save_extractor` (or any torch.export file with the same meta.json)."""
    if not os.path.isfile(path):
        raise DatasetError(f"no exported extractor at {path!r}; the method scripts write runs/<script>/<name>/"
                           f"<variant>.pt2")
    extra = {"meta.json": ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as error:  # a truncated or foreign file: say what was expected
        raise DatasetError(f"{path!r} is not a torch.export extractor file ({type(error).__name__}: {error})")
    try:
        meta = json.loads(extra["meta.json"])
    except json.JSONDecodeError:
        raise DatasetError(f"{path!r} carries no meta.json; export it with data.save_extractor")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise DatasetError(f"{path!r}: its meta.json lacks {missing}; export it with data.save_extractor")
    module = on_device(program.module(), device).to(device)
    for p in module.parameters():
        p.requires_grad_(False)
    return Extractor(module, meta, device)


# =========================================================================================================
# 7. Shared by the method files: the NMF baseline and the run helpers
#
# NMF is the unsupervised baseline of two papers (Cheng et al. Tab. 4, LEAD Tab. 1), so it lives here once. The
# run helpers are the generic part of every script; each method file keeps its own training loop in plain sight.
# The uint8 dataset, the NMF fit and the pictures at the end are code both MoCo and LEAD files would repeat.
# Every random draw after initialisation is a function of (seed, epoch, step or sample index) (`generator`), so a
# checkpoint holds models, optimisers and the step, and no random states.
# =========================================================================================================
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
    """Features (B, C, h, w) -> their NMF coefficients (B, k, h, w) for a fixed basis (k x C)."""

    def __init__(self, basis, iters):
        super().__init__()
        self.register_buffer("basis", basis)
        self.iters = iters

    def forward(self, v):
        b, c, h, w = v.shape
        W, _ = nmf(v.permute(0, 2, 3, 1).reshape(-1, c).float(), len(self.basis), self.iters, self.basis)
        return W.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def choose_device(name):
    """'auto' picks cuda, then mps, then cpu; a device that is not there stops with one sentence."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = next(d for d in ("cuda", "mps", "cpu") if available[d]) if name == "auto" else name
    if not available[name]:
        raise SystemExit(f"error: --device {name} is not available on this machine; use --device cpu")
    return torch.device(name)


AMP_HELP = ("mixed precision. auto: bf16 on a CPU and on GPUs with native bf16 (compute capability 8.0+: A100, "
            "RTX 30xx and newer), fp16 with loss scaling on older GPUs (T4, V100), none on mps")


def amp_dtype(device, amp, capability=None):
    """The autocast dtype for --amp (auto, bf16, fp16, none) on `device`, or None for fp32. `capability` is the
    CUDA compute capability (read from the device when None); bf16 is native from 8.0 (Ampere) on."""
    if amp == "auto" and device.type == "cuda":
        major, _ = capability or torch.cuda.get_device_capability(device)
        amp = "bf16" if major >= 8 else "fp16"
    elif amp == "auto":
        amp = "bf16" if device.type == "cpu" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device, dtype):
    """torch.autocast for `dtype` from amp_dtype (off when it is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device, dtype):
    """Loss scaling, on only for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


DETERMINISTIC_HELP = ("reproducible runs. On a CPU, reruns and resumes are bit-exact. On a GPU the kernels that have "
                      "a deterministic version use it (slower); bilinear upsampling and grid_sample have none for "
                      "their backward pass, so runs that train through them (LEAD stage 2, equiv_pretrain.py) "
                      "differ in the last bits (PyTorch warns once instead of stopping)")


def seed_everything(seed, deterministic=False):
    """Seed every generator (the initialisation draws from them); --deterministic as DETERMINISTIC_HELP says."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs a fixed workspace
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # warn_only: no deterministic kernel, no crash
    torch.backends.cudnn.benchmark = not deterministic


def generator(seed, *keys):
    """A CPU generator that is a pure function of (seed, *keys), e.g. (seed, epoch, step): what makes every
    random draw after initialisation reproducible on any device and after any resume."""
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(value)


def start_run(runs_dir, script, name, stage, args, resume):
    """Create <runs_dir>/<script>/<name>/, write args_<stage>.json and return the directory; an existing
    checkpoint of the stage needs --resume (or another --name)."""
    run = os.path.join(runs_dir, script, name)
    if os.path.exists(os.path.join(run, f"checkpoint_{stage}.pt")) and not resume:
        raise SystemExit(f"error: {run} already holds a {stage} checkpoint; pass --resume to continue it or "
                         f"--name to start another run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, f"args_{stage}.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    return run


def log(run, stage, record):
    """Append a record to <run>/log_<stage>.jsonl and print it as the summary line."""
    with open(os.path.join(run, f"log_{stage}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


def save_checkpoint(path, **content):
    torch.save(content, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, on the CPU; a foreign or broken file stops with one sentence."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: {path} is not a readable checkpoint of this script ({type(error).__name__}); "
                         f"delete it or choose another --name")


class EpochBatches(torch.utils.data.Sampler):
    """Batches of sample keys (epoch, index) in a shuffled order that is a function of (seed, epoch), from
    `start` (a resumed epoch skips the batches it has done). The epoch travels with every key, so a dataset
    whose samples depend on it stays in step in persistent workers, which never see the parent's attributes."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, 0, 0

    def __len__(self):
        return self.n // self.batch_size - self.start

    def __iter__(self):
        order = torch.randperm(self.n, generator=generator(self.seed, self.epoch)).tolist()
        for b in range(self.start, self.n // self.batch_size):  # drop_last
            yield [(self.epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]


def make_loader(dataset, batch_size, seed, workers, device):
    """A DataLoader made once for the whole run: persistent workers, pinned memory on CUDA. `dataset[(epoch,
    index)]` returns a dict of tensors; set `loader.batch_sampler.epoch` and `.start` before each epoch."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), batch_size, seed),
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


def default_workers(device):
    """Data-loader processes: the machine's cores on a GPU, 1 on a CPU (where every extra process competes with
    the training step for the same cores)."""
    if device.type != "cuda":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def to_device(batch, device):
    """Copy a dict of tensors to `device` with non_blocking: from pinned memory (the loader's) the host does not wait
    for the copy; from pageable memory (small per-step parameters) it does not wait for the GPU's queued work."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def torchvision_model(arch, imagenet=False):
    """torchvision's `arch`, randomly initialised or with its ImageNet weights; missing weights stop with a sentence."""
    try:
        return torchvision.models.get_model(arch, weights="IMAGENET1K_V1" if imagenet else None)
    except Exception as error:  # offline and not cached
        raise SystemExit(f"error: the ImageNet weights of {arch} could not be downloaded ({type(error).__name__}) "
                         f"nor found in {torch.hub.get_dir()}/checkpoints; run once online or drop --imagenet-init")


def training_images(dataset, root, size, n=0):
    """(the whole training split, its first n images or all for n = 0), RGB in [0, 1] (views are made before
    normalising); a missing or malformed dataset stops with its one sentence."""
    try:
        info = make_dataset(dataset, "train", root=root, size=size, normalize=False)
    except DatasetError as error:
        raise SystemExit(f"error: {error}")
    return info, torch.utils.data.Subset(info, range(min(n or len(info), len(info))))


def adjust_hue(x, shift):
    """Rotate the HSV hue of x (N x 3 x H x W in [0, 1]) by `shift` turns (N x 1 x 1 x 1), as torchvision's
    adjust_hue: value V and chroma C stay, channel n becomes V - C clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    v, c = x.amax(1, keepdim=True), x.amax(1, keepdim=True) - x.amin(1, keepdim=True)  # N x 1 x H x W
    r, g, b = x[:, :1], x[:, 1:2], x[:, 2:]
    safe = torch.where(c > 0, c, 1.0)  # grey pixels: C = 0, any hue
    h6 = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) + 6 * shift
    k = (torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1) + h6) % 6  # n = 5, 3, 1: N x 3 x H x W
    return v - c * torch.minimum(k, 4 - k).clamp_(0, 1)


class Uint8Images(Dataset):
    """The workers' share for views drawn on the device: `dataset[(epoch, index)]` (data.make_loader's keys) ->
    {"image": uint8 (3, H, W)} of a dataset whose items hold "image", RGB in [0, 1]; uint8 copies 4x fewer bytes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return {"image": (self.dataset[key[1]]["image"] * 255).round().to(torch.uint8)}


def first_images(dataset, n):
    """The first n images of a dataset, RGB in [0, 1]: (n, 3, H, W) (pictures, NMF, batch-norm statistics)."""
    return torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])


def nmf_basis(features, k, iters, seed):
    """The NMF baseline's fit on features (n, C, h, w) >= 0, every location a row: the basis (k x C) and a log
    record (its relative error ||V - W H|| / ||V||)."""
    V = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (n h w) x C
    torch.set_flush_denormal(True)  # the updates shrink unused basis entries into denormals: 2x slower on CPU
    start = time.time()
    W, basis = nmf(V, k, iters, generator=generator(seed))
    return basis, {"images": len(features), "k": k, "seconds": round(time.time() - start, 1),
                   "relative_error": round(((V - W @ basis).norm() / V.norm()).item(), 4)}


def pca_rgb(features):
    """The first 3 principal components of features (n, C, h, w), over all locations, as RGB in [0, 1]: (n, 3, h,
    w). What the features separate (supplement Fig. 1 of Cheng et al.)."""
    n, c, h, w = features.shape
    flat = features.float().permute(0, 2, 3, 1).reshape(-1, c)  # (n h w) x C
    rgb = (flat - flat.mean(0)) @ torch.pca_lowrank(flat, q=3)[2]  # (n h w) x 3
    rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values + 1e-8)
    return rgb.view(n, h, w, 3).permute(0, 3, 1, 2)


def save_pictures(path, images, maps):
    """Images (n, 3, H, W) above their maps (n, 3, h, w, resized to H x W), both in [0, 1], as one PNG."""
    maps = F.interpolate(maps.float().cpu(), size=images.shape[2:], mode="nearest")
    torchvision.utils.save_image(torch.cat([images.cpu(), maps]).clamp(0, 1), path, nrow=len(images))


# =========================================================================================================
# 8. Command line: previews of the datasets
# =========================================================================================================
def main(argv=None):
    parser = argparse.ArgumentParser(description="Look at a dataset: draws a contact sheet of samples with "
                                     "their landmarks.")
    preview = parser.add_subparsers(dest="command", required=True).add_parser(
        "preview", help="save a PNG grid of samples with landmarks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preview.add_argument("--dataset", default="synth-faces", choices=list(DATASETS), help="which data")
    preview.add_argument("--data-root", default=None, help="dataset folder (real datasets only)")
    preview.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split")
    preview.add_argument("--n", type=int, default=16, help="number of samples on the sheet")
    preview.add_argument("--image-size", type=int, default=96, help="side of the square images, in pixels")
    preview.add_argument("--out", default="preview.png", help="where to write the PNG")
    args = parser.parse_args(argv)
    try:
        dataset = make_dataset(args.dataset, args.split, root=args.data_root, size=args.image_size)
        contact_sheet(dataset, args.out, n=args.n)
    except DatasetError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.out}: {min(args.n, len(dataset))} samples of {args.dataset}/{args.split}, "
          f"{dataset.num_landmarks} landmarks each")


if __name__ == "__main__":
    main()
