"""Data and geometry shared by every script of landmark-ssl.

This is the one module the method files (moco_hypercol.py, byol_lead.py, equiv_pretrain.py) and the
evaluation (regress.py, match.py) all import. It only loads data and does geometry that they share:

1. constants and the sample format every dataset follows;
2. the built-in synthetic landmark data (faces like MAFL / 300W, birds like CUB), rendered on the fly;
3. loaders for the real datasets in the layouts their users already have on disk;
4. warps (thin-plate spline, affine, elastic) that move images and points together, exactly;
5. the exported feature-extractor contract: how a method hands its frozen dense features to the evaluation.

Sample format: ``dataset[i]`` is a dict with
  image      float32 (3, H, W), normalised with ``dataset.mean``/``dataset.std`` (RGB in [0, 1] with
             ``normalize=False``);
  keypoints  float32 (K, 2), (x, y) in pixels of the final image; pixel centres sit at integer
             coordinates, so ``2 * kp / (W - 1) - 1`` is the ``grid_sample(align_corners=True)`` coordinate
             (PROTOCOL.md section 2's normalisation); K = 0 for unlabelled data;
  visible    bool (K,);  identity  int (-1 when unknown);  index  int;
  mask       float32 (1, H, W) in {0, 1}, the exact foreground (only where ``dataset.has_mask``).
Every dataset also has: name, mean, std, size (H, W), num_landmarks, landmark_names, eye_indices (pair used
by the inter-ocular error, or None), metric ("iod", "pck" or None), has_mask, poses_per_identity (indices
P*j .. P*j+P-1 share an identity; 1 when unknown).

Command line: ``python data.py preview --dataset synth-faces-wild --out preview.png`` draws a contact sheet.
"""
import argparse
import csv
import functools
import hashlib
import itertools
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset
import torchvision.transforms.functional as TF

FACE_MEAN = (0.5084, 0.4224, 0.3769)  # DVE's statistics of aligned CelebA (PROTOCOL.md section 3)
FACE_STD = (0.2599, 0.2371, 0.2323)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # birds (CUB) use ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A dataset is missing, laid out differently than expected, or malformed (a user error)."""


# =========================================================================================================
# 2. Built-in synthetic landmark data
#
# Built-in synthetic landmark data: procedurally drawn faces (like MAFL / 300-W) and birds (like CUB).
#
# Why it exists: the real benchmarks (CelebA/MAFL, AFLW, 300-W, CUB) cannot be downloaded by this repository,
# yet every method and the evaluation must run, be tested and be understood out of the box. So this module
# draws images on the fly, from numbers alone (no files), deterministically in (seed, split, index), at any
# resolution, fast enough that data loading does not dominate training (tests/bench_data.py prints images/s per core).
#
# What it mirrors:
# - `SyntheticFaces` plays MAFL (annotation="mafl": 5 landmarks in CelebA/MAFL order: left eye, right eye,
#   nose tip, left mouth corner, right mouth corner; an eye landmark is the centre of the iris, where CelebA's
#   annotators clicked, so it follows the gaze; inter-ocular error on landmarks 0 and 1) and 300-W
#   (annotation="dense": 33 points on the jaw line, brows, nose, eye corners and lids, and lips; the
#   inter-ocular error uses the two outer eye corners, as 300-W uses points 36 and 45). variant="aligned"
#   resembles aligned CelebA crops (centred, upright, fixed scale, plain or gradient background);
#   variant="wild" adds scale, in-plane rotation (up to 30 degrees), translation, stronger yaw, cluttered
#   textured backgrounds, lighting gradients and occluders (glasses, strands of hair, foreign objects);
#   variant="clutter" keeps the aligned geometry (the very same faces, poses and landmarks as "aligned")
#   and draws them in the wild variant's scenes (clutter, lighting, occluders): it separates what the
#   frame gives away from what the scene hides.
# - `SyntheticBirds` plays CUB: the 15 CUB parts in CUB order, facing left or right under a range of view
#   angles, with a per-landmark visibility flag that is computed, not guessed (see below).
#
# Conventions (as every dataset of data.py):
# - "left"/"right" for faces follow CelebA: the left eye is the eye on the image's left side (the subject's
#   right eye). For birds they follow CUB's anatomy: the bird's own left, so a bird facing image-left shows
#   its left side and hides its right eye, wing and leg.
# - Keypoints are (x, y) pixels with pixel centres at integer coordinates. A scene is laid out in normalised
#   coordinates u in [-1, 1] and put on a grid of S pixels by x = (u + 1) (S - 1) / 2, so the same index drawn
#   at 64 and at 128 pixels has keypoints in the ratio 127 / 63, and 2 kp / (S - 1) - 1 is independent of S.
# - Every primitive (ellipses too) is a polygon whose vertices are computed in the scene and then transformed
#   (yaw, rotation, scale, 3D projection); landmarks are computed from the very same parameters and
#   transforms, so they are exact. PIL fills a polygon as if pixel i covered [i, i + 1), so vertices are
#   shifted by +0.5 before drawing: then a drawn disc's centroid lies on its centre (measured, < 0.5 px).
# - Drawing produces a label map (one integer per primitive type, painter's order = z-order); the RGB image
#   is coloured from it (colour table, cached noise textures, shading), the foreground mask is a set of labels
#   (faces: the person with hair, clothes and glasses; birds: the bird), and a bird landmark is visible iff
#   it lies in the image and the topmost part drawn at its pixel is the part it belongs to; for points on the
#   head or body surface its surface normal must also face the viewer (up to 25 degrees past the
#   silhouette). Face landmarks are visible iff they lie inside the image (as in MAFL and 300-W).
# - Identity: indices P*j .. P*j+P-1 (P = poses_per_identity) share identity j of the split; identity ids of
#   train, val and test come from disjoint ranges. Identity parameters (head shape, feature sizes and
#   spacing, colours, hair style; bird shape and plumage) are drawn from (seed, identity) only, pose and
#   expression parameters (mouth, smile, eye openness, gaze, brows, head pose; bird view, wings, legs) and
#   the scene (background, lighting) from (seed, variant, split, index). The aligned and wild variants
#   therefore show the same people. (Reproducible for a given numpy version: numpy's random streams.)
# - `params(index)` returns every number a sample is drawn from, `render(params, with_labels=True)` draws
#   any (edited) parameter dict and also returns the label map; tests use them to check the geometry.
#
# Look at it: `python data.py preview --dataset synth-birds --out birds.png` (see `contact_sheet`).
# =========================================================================================================
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS = {"train": 10000, "val": 1000, "test": 1000}
IDENTITY_BLOCK = 10 ** 8  # identity ids of split s lie in [s * IDENTITY_BLOCK, (s + 1) * IDENTITY_BLOCK)

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

# Label maps: one id per kind of primitive; ids 1..CLUTTER are background clutter shapes.
CLUTTER = 8
FACE_LABELS = ["background"] + ["clutter"] * CLUTTER + [
    "shirt", "neck", "ear", "skin", "brow", "hair", "nose", "nostril", "nose tip", "sclera", "iris", "pupil",
    "lips", "mouth", "teeth", "lens", "glasses", "occluder"]
BIRD_LABELS = ["background"] + ["clutter"] * CLUTTER + [
    "perch", "left leg", "right leg", "body", "belly", "breast", "head", "cap", "throat", "eye ring",
    "left eye", "right eye", "beak", "left wing", "right wing", "left wing bar", "right wing bar", "tail"]
FACE = {name: i for i, name in enumerate(FACE_LABELS)}
BIRD = {name: i for i, name in enumerate(BIRD_LABELS)}

# Palettes that colour parameters index into; RGB in [0, 1].
SKIN = np.array([[0.97, 0.84, 0.74], [0.90, 0.72, 0.58], [0.76, 0.55, 0.40], [0.55, 0.37, 0.25],
                 [0.34, 0.22, 0.15]], np.float32)
HAIR = np.array([[0.07, 0.06, 0.05], [0.24, 0.15, 0.08], [0.45, 0.30, 0.16], [0.86, 0.71, 0.42],
                 [0.62, 0.26, 0.10], [0.68, 0.68, 0.68]], np.float32)
EYES = np.array([[0.33, 0.19, 0.09], [0.45, 0.35, 0.15], [0.28, 0.46, 0.26], [0.28, 0.46, 0.72],
                 [0.50, 0.55, 0.60]], np.float32)
PLUMAGE = np.array([[0.45, 0.32, 0.20], [0.50, 0.50, 0.50], [0.45, 0.45, 0.25], [0.12, 0.12, 0.12],
                    [0.78, 0.16, 0.12], [0.20, 0.36, 0.72], [0.92, 0.78, 0.18], [0.66, 0.36, 0.15],
                    [0.92, 0.92, 0.90], [0.86, 0.76, 0.56]], np.float32)

# Shape templates (numpy calls cost microseconds each, so shapes are scaled templates, not rebuilt).
X13 = np.linspace(-1.0, 1.0, 13)
RAMP24, RAMP10 = np.linspace(0.0, 1.0, 24), np.linspace(0.0, 1.0, 10)[:, None]
LENS_X = np.concatenate([X13, X13[-2:0:-1]])  # a lens between two parabolas through (-1, 0) and (1, 0):
LENS_ARC = 1.0 - LENS_X ** 2                  # upper arc left to right, then lower arc right to left
LENS_TOP = np.arange(len(LENS_X)) < 13
LENS_X2 = LENS_X ** 2  # a smile lifts the mouth line's ends by this
BAND_S = np.concatenate([np.linspace(-1.0, 1.0, 9), np.linspace(1.0, -1.0, 9)])  # a band around a curve
BAND_SIDE = np.where(np.arange(18) < 9, -0.5, 0.5)
CIRCLE48 = np.stack([np.cos(np.arange(48) * math.pi / 24), np.sin(np.arange(48) * math.pi / 24)], 1)
CIRCLE32 = np.stack([np.cos(np.arange(32) * math.pi / 16), np.sin(np.arange(32) * math.pi / 16)], 1)
CIRCLE16 = CIRCLE48[::3]
JAW_TAPER = np.maximum(CIRCLE48[:, 1], 0.0) ** 2  # the face outline narrows its lower half by chin * this
CIRCLE12 = CIRCLE48[::4]
_CORNERS, _STEPS = CIRCLE12[[1, 5, 9, 1]] * 1.3, np.linspace(0, 1, 4, endpoint=False)[:, None]
CLUTTER_SHAPES = np.stack([  # background shapes with 12 vertices each, so they transform in one call
    CIRCLE12, np.clip(1.5 * CIRCLE12, -1.0, 1.0),  # an ellipse, a box with its corners cut, a triangle
    np.concatenate([_CORNERS[k] + _STEPS * (_CORNERS[k + 1] - _CORNERS[k]) for k in range(3)])]) @ [1, 1j]


def _rng(seed, stream, number):
    """A numpy Generator for (seed, stream, number); distinct triples never share a seed."""
    return np.random.default_rng((seed << 48) | (stream << 44) | number)


def _draw_params(rng, spec):
    """Draw one value per entry of `spec` ({name: (low, high) for uniform floats, or k for an int in [0, k)}).

    All values come from one `rng.random` call, in the spec's order, so the numbers are plain Python.
    """
    u = rng.random(len(spec)).tolist()
    return {name: int(x * value) if isinstance(value, int) else value[0] + (value[1] - value[0]) * x
            for x, (name, value) in zip(u, spec.items())}


def _uniforms(rng, count=64):
    """A cheap stream of uniform numbers: u(low, high) returns the next one (one numpy call in all)."""
    stream = iter(rng.random(count).tolist())
    return lambda low=0.0, high=1.0: low + (high - low) * next(stream)


def _palette(table, index, shade):
    """Colour `index` of a palette, brightened or darkened by the factor `shade` > 0."""
    return np.minimum(table[index] * shade, 1.0)


@functools.lru_cache(maxsize=8)
def _textures(size):
    """Noise textures shared by all images of one size, computed once per process (fixed seed).

    Returns float32 (2, T, T), T = 256 * size / 96, so that the grain per scene unit is the same at every
    resolution: channel 0 is value noise summed over octaves (skin, plumage, backgrounds), channel 1
    vertical streaks (hair, feathers, bark). Each channel has zero mean and unit standard deviation.
    """
    rng = np.random.default_rng(96)
    side = round(256 * size / 96)
    channels = []
    for grids in ([(g, g) for g in (4, 8, 16, 32, 64, 128)], [(g // 8, g) for g in (32, 64, 128)]):
        total = np.zeros((side, side), np.float32)
        for octave, (rows, columns) in enumerate(grids):  # bilinear upsampling of random grids
            grid = Image.fromarray(rng.standard_normal((rows, columns)).astype(np.float32), mode="F")
            total += np.asarray(grid.resize((side, side), Image.BILINEAR)) * 0.7 ** octave
        channels.append((total - total.mean()) / total.std())
    return np.stack(channels)


@functools.lru_cache(maxsize=4096)
def _identity_params(seed, stream, identity):
    """The identity parameters drawn from stream 0 (faces) or 3 (birds), cached per process.

    The P poses of an identity, and every epoch, draw the same numbers; callers get copies (see
    identity_params), so that editing a parameter dict never changes the cache.
    """
    return _draw_params(_rng(seed, stream, identity), FACE_IDENTITY if stream == 0 else BIRD_IDENTITY)


@functools.lru_cache(maxsize=8)
def _axis(size):
    """Normalised coordinates of the pixel centres along one axis of an S-pixel image, float32 (S,)."""
    return np.linspace(-1.0, 1.0, size, dtype=np.float32)


def _polygon(draw, pixels, label):
    """Fill a polygon given in pixel-centre coordinates (N, 2); see the module docstring for the +0.5."""
    draw.polygon((pixels + 0.5).ravel().tolist(), fill=label)


def _cut(points, normal, offset):
    """The vertices of a convex polygon (N, 2) where points @ normal >= offset: the polygon cut by a line.

    The cut edge is a chord between two vertices rather than exactly the line: fine for colour patches.
    """
    return points[points @ normal >= offset]


def _clutter(draw, rng, size):
    """Draw 3..CLUTTER random ellipses, boxes and triangles as labels 1, 2, ...; returns how many.

    The shapes are complex numbers x + iy: scaling the template by (rx, ry), rotating it by the angle a
    and moving it is (rx x + i ry y) e^(ia) + centre, a few array operations for all shapes at once; and a
    complex array viewed as floats is the flat x0, y0, x1, y1, ... list that PIL's polygon() takes.
    """
    count = int(rng.integers(3, CLUTTER + 1))
    v = rng.random((count, 6))
    template = CLUTTER_SHAPES[(3 * v[:, 3]).astype(int)]  # (n, 12) complex
    shapes = ((0.08 + 0.32 * v[:, 1:2]) * template.real + 1j * (0.08 + 0.32 * v[:, 2:3]) * template.imag)
    shapes = shapes * np.exp(1j * math.pi * v[:, 0:1]) + (2.2 * v[:, 4:5] - 1.1) + 1j * (2.2 * v[:, 5:6] - 1.1)
    corners = ((shapes + (1 + 1j)) * ((size - 1) / 2) + (0.5 + 0.5j)).view(np.float64).tolist()  # _polygon
    for label in range(count):
        draw.polygon(corners[label], fill=label + 1)
    return count


@functools.lru_cache(maxsize=4)
def _clutter_layouts(size):
    """Background clutter drawn once per process (fixed seed): "L" label images and their shape counts.

    Drawing several large polygons per sample would cost a tenth of the rendering time; a sample takes
    one of these N layouts (256 at 96 pixels, fewer for large images to bound the memory) in one of its
    8 rotations and mirror images, and gives its shapes new colours (see _background).
    """
    rng = np.random.default_rng(8)
    layouts, counts = [], []
    for _ in range(max(8, min(256, 2 ** 23 // size ** 2))):
        layouts.append(Image.new("L", (size, size), 0))
        counts.append(_clutter(ImageDraw.Draw(layouts[-1]), rng, size))
    return layouts, counts


# The 8 orientations of a clutter layout as PIL transposes, indexed [mirrored][quarter turns]: the same
# pixels as np.rot90(layout, turns), then [:, ::-1] if mirrored, but one C pass that also makes the copy.
_ORIENTATIONS = [[None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270],
                 [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.TRANSVERSE, Image.Transpose.FLIP_TOP_BOTTOM,
                  Image.Transpose.TRANSPOSE]]


def _background(rng, size, table, spread):
    """A new "L" label canvas of background clutter; its shapes get colours in table[1:] near table[0]."""
    layouts, counts = _clutter_layouts(size)
    v = rng.random((CLUTTER + 1, 4))  # rows 0..CLUTTER-1: a colour per shape; the last row picks the layout
    pick = int(v[-1, 0] * len(layouts))
    count = counts[pick]
    colours = table[0] * (0.6 + 0.8 * v[:count, :1]) + spread * (2 * v[:count, 1:] - 1)
    table[1:count + 1] = np.minimum(np.maximum(colours, 0.03), 0.97)
    orientation = _ORIENTATIONS[int(v[-1, 2] < 0.5)][int(v[-1, 1] * 4)]
    # a new image either way: drawing must not touch the bank
    return layouts[pick].copy() if orientation is None else layouts[pick].transpose(orientation)


def _label_table(colours, texture, streaks, shade, foreground):
    """The per-label table (L, 8) that _compose reads: RGB colour, texture, streaks, shade, foreground, 0.

    The zero pads a row to 32 bytes: np.take copies rows of 8, 16 or 32 bytes with a specialised loop and
    other sizes with memmove, which made the gather three times slower with 28-byte rows.
    """
    padding = np.zeros(len(shade))
    return np.column_stack([colours, texture, streaks, shade, foreground, padding]).astype(np.float32)


def _compose(labels, lut, offset, light, falloff=None):
    """Colour a label map: colour * (light + texture noise + streaks streak noise - shade falloff), per label.

    labels: (S, S) intp; lut: (L, 8) per-label table (see _label_table); offset: two numbers in [0, 1)
    placing the texture crop; light: (S, S) lighting; falloff: (S, S) darkening of shaded labels (or None).
    One gather reads every per-label number for every pixel, so the image costs a few full-image passes.
    Returns the image, float32 (3, S, S) in [0, 1], and the foreground mask, float32 (1, S, S).
    """
    size = labels.shape[0]
    noise = _textures(size)
    oy, ox = int(offset[0] * (noise.shape[1] - size)), int(offset[1] * (noise.shape[2] - size))
    crop = noise[:, oy:oy + size, ox:ox + size]
    per = np.take(lut, labels, axis=0)  # (S, S, 8)
    factor = light + per[..., 3] * crop[0]
    factor += per[..., 4] * crop[1]
    if falloff is not None:
        factor -= per[..., 5] * falloff
    image = np.multiply(per[..., :3].transpose(2, 0, 1), factor, out=np.empty((3, size, size), np.float32))
    return np.clip(image, 0.0, 1.0, out=image), np.ascontiguousarray(per[None, ..., 6])


class _Synthetic(Dataset):
    """What faces and birds share: splits, lengths, identities, determinism and the sample dict."""

    def __init__(self, split, size, length, seed, normalize, mean, std):
        if split not in SPLIT_CODES:
            raise DatasetError(f"unknown split {split!r}; expected one of: train, val, test")
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise DatasetError(f"synthetic images are square: expected size S or (S, S), got {size!r}")
            size = size[0]
        if not 16 <= int(size) <= 4096:
            raise DatasetError(f"synthetic images are 16 to 4096 pixels wide; got size {size}")
        if int(seed) < 0:
            raise DatasetError(f"the synthetic data's seed is a non-negative integer; got {seed}")
        self.split, self.seed, self.normalize = split, int(seed), normalize
        self.poses_per_identity = 4
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if not 0 < self.length <= IDENTITY_BLOCK:
            raise DatasetError(f"length is between 1 and {IDENTITY_BLOCK}; got {length}")
        self.size = (int(size), int(size))
        self.mean, self.std = mean, std
        self.has_mask = True
        self._scale = (1.0 / np.array(std, np.float32))[:, None, None]
        self._shift = (-np.array(mean, np.float32) / np.array(std, np.float32))[:, None, None]

    def __len__(self):
        return self.length

    def identity(self, index):
        """Global identity id of sample `index`; the id ranges of train, val and test are disjoint."""
        return SPLIT_CODES[self.split] * IDENTITY_BLOCK + index // self.poses_per_identity

    def params(self, index):
        """Every number sample `index` is drawn from: its identity_params and its pose_params."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of length {self.length}")
        return {**self.identity_params(self.identity(index)), **self.pose_params(index)}

    def _pose_rng(self, stream, index):
        return _rng(self.seed, stream, SPLIT_CODES[self.split] << 40 | index)

    def __getitem__(self, index):
        sample = self.render(self.params(index))
        sample["identity"], sample["index"] = self.identity(index), index
        return sample

    def _sample(self, image, mask, labels, keypoints, visible, with_labels):
        """The sample dict of data.py from a new RGB (3, S, S) image in [0, 1], its mask and label map."""
        if self.normalize:  # in place: the image is this sample's own array
            image *= self._scale
            image += self._shift
        sample = {"image": torch.from_numpy(image),
                  "keypoints": torch.from_numpy(keypoints.astype(np.float32)),
                  "visible": torch.from_numpy(visible),
                  "mask": torch.from_numpy(mask)}
        if with_labels:
            sample["labels"] = torch.from_numpy(labels.astype(np.int64))
        return sample


# ---------------------------------------------------------------------------------------------------------
# Faces
# ---------------------------------------------------------------------------------------------------------
# Identity: shape and appearance. Scene units: the aligned face is centred, head half-width head_w.
FACE_IDENTITY = {
    "head_w": (0.60, 0.72), "head_h": (0.84, 0.95), "chin": (0.0, 0.35),  # ellipse a, b; jaw taper
    "eye_y": (-0.19, -0.09), "eye_dx": (0.40, 0.48), "eye_w": (0.075, 0.100),  # eye x = eye_dx * head_w
    "eye_tilt": (-0.10, 0.20), "iris": (0.38, 0.48), "brow_gap": (0.08, 0.13), "brow_thick": (0.022, 0.042),
    "brow_len": (1.1, 1.4), "brow_arch": (0.005, 0.04), "nose_y": (0.16, 0.27), "nose_w": (0.065, 0.10),
    "nose_depth": (0.10, 0.22), "mouth_y": (0.44, 0.56), "mouth_w": (0.17, 0.25), "lip_up": (0.018, 0.035),
    "lip_low": (0.025, 0.05), "ear": (0.8, 1.2), "skin": (0.0, 1.0), "hair_colour": len(HAIR),
    "hair_shade": (0.8, 1.2), "eye_colour": len(EYES), "lip_tint": (0.55, 0.8), "shirt": (0.0, 1.0),
    "hair_volume": (1.03, 1.13), "hairline": (-0.80, -0.50), "side_len": (-0.35, 0.35),
    "side_thick": (0.06, 0.22), "fringe": (0.0, 1.0), "long_hair": (0.0, 1.0), "glasses": (0.0, 1.0),
}
# Pose and expression (mouth_open <= 0 means closed) and the scene's random seed.
FACE_POSE = {
    "mouth_open": (-0.06, 0.07), "smile": (-0.3, 1.0), "eye_open": (0.45, 1.0), "gaze_x": (-1.0, 1.0),
    "gaze_y": (-1.0, 1.0), "brow_raise": (0.0, 1.0), "scene": 2 ** 31,
}
# Head pose per variant: yaw and roll in radians, x and y place the face centre.
FACE_HEAD = {
    "aligned": {"yaw": (-0.14, 0.14), "roll": (-0.05, 0.05), "scale": (0.97, 1.03), "x": (-0.03, 0.03),
                "y": (-0.03, 0.03)},
    "wild": {"yaw": (-0.45, 0.45), "roll": (-0.52, 0.52), "scale": (0.45, 0.85), "x": (-1.0, 1.0),
             "y": (-1.0, 1.0)},
}
FACE_HEAD["clutter"] = FACE_HEAD["aligned"]  # aligned geometry in wild scenes


# Per-label constants: colours that never change, texture strengths (index [wild scene]), shading strength, and
# the foreground (the person, with hair, clothes and glasses; not the background, clutter or occluder).
FACE_TABLE = np.zeros((len(FACE_LABELS), 3), np.float32)
FACE_TABLE[[FACE["sclera"], FACE["pupil"], FACE["mouth"], FACE["teeth"], FACE["lens"], FACE["glasses"]]] = [
    (0.95, 0.93, 0.9), (0.03, 0.03, 0.03), (0.25, 0.05, 0.05), (0.92, 0.9, 0.85), (0.12, 0.14, 0.16),
    (0.1, 0.1, 0.12)]
FACE_TEXTURE = np.zeros((2, len(FACE_LABELS)), np.float32)
FACE_TEXTURE[:, :CLUTTER + 1] = [[0.04], [0.22]]  # background and clutter, aligned and wild
FACE_TEXTURE[:, [FACE["skin"], FACE["ear"], FACE["neck"], FACE["nose"], FACE["nose tip"]]] = 0.03
FACE_TEXTURE[:, [FACE["shirt"], FACE["occluder"]]] = 0.08
FACE_STREAKS = np.zeros(len(FACE_LABELS), np.float32)
FACE_STREAKS[[FACE["hair"], FACE["brow"]]] = 0.25
# Skin tone factors of the skin, ear, neck, nose, nose tip and nostril; hue offsets of a shirt's R, G, B.
SKIN_LABELS = np.array([FACE[name] for name in ("skin", "ear", "neck", "nose", "nose tip", "nostril")])
SKIN_SHADES = np.array([[1.0], [0.95], [0.85], [0.92], [1.0], [0.4]], np.float32)
SHIRT_HUE = np.array([0.0, 2.0, 4.0])
FACE_SHADE = np.zeros(len(FACE_LABELS), np.float32)
FACE_SHADE[[FACE["skin"], FACE["nose"], FACE["nose tip"], FACE["ear"]]] = 0.3
FACE_FOREGROUND = np.zeros(len(FACE_LABELS), np.float32)
FACE_FOREGROUND[FACE["shirt"]:FACE["glasses"] + 1] = 1.0
FACE_LUTS = [_label_table(FACE_TABLE, FACE_TEXTURE[wild], FACE_STREAKS, FACE_SHADE, FACE_FOREGROUND)
             for wild in (0, 1)]
# Labels, point counts and lifts of the shapes render builds for every image.
BROW_LABELS, MOUTH_LABELS = [FACE["brow"]] * 2, [FACE["mouth"], FACE["teeth"]]
EYE_LABELS, EYE_COUNTS = [FACE["sclera"], FACE["iris"], FACE["pupil"]] * 2, [24, 16, 16] * 2
ZERO_LIFT, MOUTH_LIFT, STRAND_LIFT = np.zeros(112), np.full(48, 0.03), np.full(20, 0.1)
MIRROR = np.array([[-1.0], [1.0]])  # x of the image-left eye's frame points the other way


def _shape_block(shapes):
    """(label, (n, 2) points, lift) triples as one block: (labels, counts, (N, 2) points, (N,) lift).

    lift is the depth a shape adds to the head's (a number, or one per point; see SyntheticFaces.render).
    The identity's blocks are concatenated once, when the cache fills, instead of for every image.
    """
    counts = [len(points) for _, points, _ in shapes]
    lifts = [np.full(n, lift) if isinstance(lift, float) else lift for (_, _, lift), n in zip(shapes, counts)]
    return ([label for label, _, _ in shapes], counts, np.concatenate([points for _, points, _ in shapes]),
            np.concatenate(lifts))


@functools.lru_cache(maxsize=1024)
def _face_identity_shapes(identity):
    """The parts of a face that depend on its identity alone, cached per process like the identity numbers.

    identity: the values of FACE_IDENTITY's parameters, in its order. Returns a dict (callers must not
    modify its arrays): "behind", "front" and "glasses", the shape blocks (see _shape_block) drawn below the
    brows (long hair, shirt, neck, ears, face outline), above them (hair, nose) and, in the wild variant,
    after the mouth (glasses; None for a face without); the landmarks "jaw" (9, 2) and "nose" (4, 2), and
    "mark_lift" (38,) of all landmarks; and what the brows and eyes that the pose moves start from.
    """
    p = dict(zip(FACE_IDENTITY, identity))
    a, b, eye_y = p["head_w"], p["head_h"], p["eye_y"]
    eye_x, ew = a * p["eye_dx"], p["eye_w"]
    shapes = []

    # Behind the face: long hair, the shirt, the neck and the ears.
    if p["long_hair"] > 0.55:
        length = b * (0.3 + 0.8 * (p["long_hair"] - 0.55) / 0.45)
        top = CIRCLE32[16:][::-1] * [a * p["hair_volume"] * 1.08, b * p["hair_volume"]]
        shapes.append((FACE["hair"], np.concatenate([[[a * 1.2, length]], top, [[-a * 1.2, length]]]),
                       0.0))
    shapes.append((FACE["shirt"], np.array([[-0.45, 0.78], [0.45, 0.78], [1.3, 1.15], [1.6, 2.2],
                                            [-1.6, 2.2], [-1.3, 1.15]]) * [a / 0.65, b], 0.0))
    shapes.append((FACE["neck"], np.array([[-0.5, 0.0], [0.5, 0.0], [0.52, 1.0], [0.0, 1.12],
                                           [-0.52, 1.0]]) * [a, b], 0.0))
    ear = CIRCLE16 * [0.14 * a * p["ear"], 0.2 * b * p["ear"]]
    shapes += [(FACE["ear"], ear + [side * 0.98 * a, 0.08 * b], 0.0) for side in (-1, 1)]

    # Face outline: an ellipse whose lower half narrows towards the chin. The 9 jaw landmarks are
    # vertices of it, at 180, 157.5, ..., 0 degrees (image-left, through the chin at 90, to image-right).
    outline = CIRCLE48 * [a, b]
    outline[:, 0] *= 1.0 - p["chin"] * JAW_TAPER
    shapes.append((FACE["skin"], outline, 0.0))
    face = {"behind": _shape_block(shapes), "jaw": outline[24::-3]}
    shapes = []  # the brows come next (they depend on the pose), then what follows

    # Hair on the head, drawn over the brows as a fringe would be: the outline swollen by hair_volume
    # from one side over the top to the other, closed by the hairline (a parabola, jagged for a fringe).
    volume, inset = p["hair_volume"], a * (1.0 - p["side_thick"])
    line_y = b * p["hairline"] + 0.25 * b * X13 ** 2
    if p["fringe"] > 0.6:
        line_y = line_y + 0.06 * b * (np.arange(13) % 2) + 0.15 * b * (p["fringe"] - 0.6)
    side_y = max(b * p["side_len"], line_y[0] + 0.05 * b)  # side locks end below the hairline
    end = math.asin(min(side_y / (b * volume), 0.95))
    t = (math.pi - end) + (math.pi + 2 * end) * RAMP24  # from pi - end to 2 pi + end
    shapes.append((FACE["hair"], np.concatenate([
        np.stack([a * volume * np.cos(t), b * volume * np.sin(t)], 1), [[inset, side_y + 0.06 * b]],
        np.stack([-X13 * inset, line_y], 1), [[-inset, side_y + 0.06 * b]]]), 0.0))

    # Nose: a shaded wedge from the bridge to the nostril wings, the nostrils, and the tip (its landmark).
    nose_y, nw, depth = p["nose_y"], p["nose_w"], p["nose_depth"]
    wedge = np.array([[-0.02, eye_y + 0.04], [-nw, nose_y - 0.01], [-0.5 * nw, nose_y + 0.04],
                      [0.5 * nw, nose_y + 0.04], [nw, nose_y - 0.01], [0.02, eye_y + 0.04]])
    shapes.append((FACE["nose"], wedge, np.array([0.1, 0.5, 0.9, 0.9, 0.5, 0.1]) * depth))
    nostril = CIRCLE16 * [0.24 * nw, 0.12 * nw]
    shapes += [(FACE["nostril"], nostril + [-0.5 * nw, nose_y + 0.015], 0.6 * depth),
               (FACE["nostril"], nostril + [0.5 * nw, nose_y + 0.015], 0.6 * depth),
               (FACE["nose tip"], CIRCLE16 * [0.38 * nw, 0.3 * nw] + [0.0, nose_y], depth)]
    face["front"] = _shape_block(shapes)
    face["nose"] = np.array([[0.0, eye_y + 0.04], [0.0, nose_y], [-nw, nose_y - 0.01], [nw, nose_y - 0.01]])

    # Brows: a band around an arched centre line, thinner at the outer end; its x, and the arch and the
    # thickness that render adds to the pose-dependent height.
    band_x = eye_x + 0.1 * ew + BAND_S * ew * p["brow_len"]  # BAND_S: -1 at the inner end, +1 outer
    face["brows"] = np.stack([band_x, np.zeros(18)], 1) * [[[-1.0, 1.0]], [[1.0, 1.0]]]  # (2, 18, 2)
    face["brow_arch"] = p["brow_arch"] * (1 - BAND_S ** 2)
    face["brow_side"] = BAND_SIDE * p["brow_thick"] * (1.0 - 0.175 * (BAND_S + 1))

    # Eyes: the lids' x, the iris and pupil circles (eye, iris/pupil, 16, 2) before the gaze moves them.
    face["almond_x"] = LENS_X * ew
    face["rings"] = CIRCLE16 * np.array([[[p["iris"] * ew]], [[0.45 * p["iris"] * ew]]])

    # Glasses (drawn in the wild variant only): a ring round each eye plus bars (temples, bridge).
    face["glasses"] = None
    if p["glasses"] > 0.65:
        rim = CIRCLE16 * [1.45 * ew, 1.15 * ew]
        ring = np.concatenate([rim * (1.0 + 0.012 / ew), rim[::-1] * (1.0 - 0.012 / ew)])

        def bar(x0, x1):  # a horizontal bar of the frame at eye height
            return np.array([[x0, eye_y - 0.012], [x1, eye_y - 0.012], [x1, eye_y + 0.012],
                             [x0, eye_y + 0.012]])

        shapes = []
        for side in (-1, 1):
            if p["glasses"] > 0.9:  # sunglasses
                shapes.append((FACE["lens"], rim + [side * eye_x, eye_y], 0.0))
            shapes += [(FACE["glasses"], ring + [side * eye_x, eye_y], 0.0),
                       (FACE["glasses"], bar(side * (eye_x + 1.4 * ew), side * 0.99 * a), 0.0)]
        shapes.append((FACE["glasses"], bar(1.4 * ew - eye_x, eye_x - 1.4 * ew), 0.05))
        face["glasses"] = _shape_block(shapes)

    # The landmarks' lift (their order: see render).
    mark_lift = np.zeros(38)
    mark_lift[[2, 21]] = depth  # nose tip
    mark_lift[[20, 22, 23]] = [0.1 * depth, 0.5 * depth, 0.5 * depth]  # bridge, nostril wings
    mark_lift[[3, 4, 32, 33, 34, 35, 36, 37]] = 0.03  # mouth
    face["mark_lift"] = mark_lift
    return face


class SyntheticFaces(_Synthetic):
    """Procedural faces with MAFL-style (5) or dense (33, 300-W-like) landmarks; see the module docstring.

    Sample `index` shows identity index // poses_per_identity of its split. `params(index)` returns every
    number the sample is drawn from, and `render(params)` draws any (e.g. edited) parameter dict.
    """

    def __init__(self, split="train", variant="aligned", annotation="mafl", size=96, length=None, seed=0,
                 normalize=True):
        if variant not in FACE_HEAD:
            raise DatasetError(f"unknown face variant {variant!r}; expected 'aligned', 'clutter' or 'wild'")
        if annotation not in ("mafl", "dense"):
            raise DatasetError(f"unknown face annotation {annotation!r}; expected 'mafl' or 'dense'")
        super().__init__(split, size, length, seed, normalize, FACE_MEAN, FACE_STD)
        self.variant, self.annotation = variant, annotation
        self.name = "synth-faces" + f"-{variant}" * (variant != "aligned") + "-dense" * (annotation == "dense")
        self.landmark_names = list(MAFL_NAMES if annotation == "mafl" else DENSE_FACE_NAMES)
        self.num_landmarks = len(self.landmark_names)
        self.eye_indices = (0, 1) if annotation == "mafl" else (19, 25)  # dense: the outer eye corners
        self.metric = "iod"
        self.label_names = FACE_LABELS

    def identity_params(self, identity):
        """Shape and appearance of `identity` (a global id, see identity()), a dict of numbers."""
        return dict(_identity_params(self.seed, 0, identity))

    def pose_params(self, index):
        """Head pose, expression and scene of sample `index` (depending on the variant, not the identity;
        "clutter" draws from the aligned stream, so its faces and landmarks are the aligned ones)."""
        return _draw_params(self._pose_rng(1 + (self.variant == "wild"), index),
                            {**FACE_POSE, **FACE_HEAD[self.variant]})

    def render(self, p, with_labels=False):
        """Draw the face described by the parameter dict `p` (as returned by params()).

        Returns the sample dict without identity and index; with_labels=True adds "labels", the (S, S)
        int64 label map whose ids index `self.label_names`.
        """
        size, wild = self.size[0], self.variant == "wild"  # wild geometry
        scenic = self.variant != "aligned"  # wild scenes: clutter, textures, light, glasses, occluders
        rng = np.random.default_rng(p["scene"])
        u = _uniforms(rng)
        a, b = p["head_w"], p["head_h"]
        eye_x, eye_y, ew = a * p["eye_dx"], p["eye_y"], p["eye_w"]

        # What depends on the identity alone (the shapes behind the face, its outline, hair, nose and
        # glasses, the jaw and nose landmarks) comes from a cache; the pose moves the brows, eyes and mouth.
        face = _face_identity_shapes(tuple(p[name] for name in FACE_IDENTITY))

        # Brows: the identity's bands (2, 18, 2) (image-left, image-right) at a height lifted by brow_raise.
        bands = face["brows"].copy()
        bands[..., 1] = eye_y - p["brow_gap"] - 0.035 * p["brow_raise"] - face["brow_arch"] + face["brow_side"]
        # Centre lines: outer end, middle, inner end, the midpoints of vertex pairs (8, 9), (4, 13), (0, 17).
        ends = (bands[:, 8::-4] + bands[:, 9::4]) / 2
        brows = [ends[0], ends[1, ::-1]]

        # Eyes, built in an eye frame (x towards the outer corner, y down, origin between the corners):
        # lids are parabolas through the corners, the iris (its centre is the eye landmark, moved by the
        # gaze) and the pupil are clipped to the opening; then tilted and mirrored into the scene.
        # Both eyes at once: axis 0 is (image-left eye, image-right eye), whose frames mirror each other.
        up, low = 0.65 * ew * p["eye_open"], 0.5 * ew * p["eye_open"]
        gaze = 0.3 * ew * p["gaze_x"]
        iris = np.array([[-gaze, 0.1 * ew * p["gaze_y"]], [gaze, 0.1 * ew * p["gaze_y"]]])  # (2, 2)
        rings = face["rings"] + iris[:, None, None]  # (eye, iris/pupil, 16, 2)
        x = np.minimum(np.maximum(rings[..., 0], -ew), ew)
        limit = 1.0 - (x / ew) ** 2
        local = np.empty((2, 61, 2))  # per eye: lids (24), iris and pupil (32), corners and lid middles, iris
        local[:, :24, 0] = face["almond_x"]
        local[:, :24, 1] = np.where(LENS_TOP, -up, low) * LENS_ARC
        local[:, 24:56, 0] = x.reshape(2, 32)
        local[:, 24:56, 1] = np.minimum(np.maximum(rings[..., 1], -up * limit), low * limit).reshape(2, 32)
        local[:, 56:60] = [[ew, 0.0], [0.0, -up], [-ew, 0.0], [0.0, low]]
        local[:, 60] = iris
        cos_t, sin_t = math.cos(p["eye_tilt"]), -math.sin(p["eye_tilt"])  # tilt: outer corner up
        scene = np.empty((2, 61, 2))
        scene[..., 0] = MIRROR * (cos_t * local[..., 0] - sin_t * local[..., 1] + eye_x)
        scene[..., 1] = sin_t * local[..., 0] + cos_t * local[..., 1] + eye_y
        eyes = scene[:, 56:]  # (2, 5, 2): outer corner, upper lid, inner corner, lower lid, iris centre

        # Mouth: lip curves meet at the two corners (the landmarks); a smile lifts the corners, an open
        # mouth separates the inner curves and shows the mouth and the upper teeth.
        gap = max(p["mouth_open"], 0.0) / 2
        mw = p["mouth_w"] * (1.0 + 0.1 * p["smile"])
        bend = p["mouth_y"] - 0.045 * p["smile"] * LENS_X2  # the mouth line, corners lifted by a smile
        lips = np.empty((24, 2))
        lips[:, 0] = LENS_X * mw
        lips[:, 1] = bend + np.where(LENS_TOP, -p["lip_up"] - gap, p["lip_low"] + gap) * LENS_ARC
        # The shapes in drawing order, as blocks (labels, counts, points, lift); see _shape_block.
        blocks = [face["behind"], (BROW_LABELS, [18, 18], bands.reshape(36, 2), ZERO_LIFT[:36]), face["front"],
                  (EYE_LABELS, EYE_COUNTS, scene[:, :56].reshape(112, 2), ZERO_LIFT),
                  ([FACE["lips"]], [24], lips, MOUTH_LIFT[:24])]
        if gap > 0.002:
            inner = np.empty((48, 2))  # the open mouth, then the teeth (the same but for a shorter lower arc)
            inner[:24, 0] = inner[24:, 0] = lips[:, 0]
            inner[:24, 1] = inner[24:, 1] = bend + np.where(LENS_TOP, -gap, gap) * LENS_ARC
            inner[37:, 1] = bend[13:] + (min(2 * gap, 0.025) - gap) * LENS_ARC[13:]
            blocks.append((MOUTH_LABELS, [24, 24], inner, MOUTH_LIFT))
            mouth_inner = inner[6:19:12]  # the middles of the inner curves, rows 6 and 18
        else:
            mouth_inner = np.array([[0.0, p["mouth_y"]]] * 2)
        mouth = lips[::6]  # rows 0, 6, 12, 18: left corner, upper lip top, right corner, lower lip bottom

        # Wild scenes: glasses (an identity trait, drawn in wild scenes only) and a loose strand of hair
        # across the face.
        if scenic and face["glasses"] is not None:
            blocks.append(face["glasses"])
        if scenic and u() < 0.3:
            start = np.array([u(-0.6, 0.6) * a, b * p["hairline"]])
            s = RAMP10
            path = start + s * [u(-0.3, 0.3), u(0.4, 0.9)] + u(-0.15, 0.15) * np.sin(math.pi * s) * [1, 0]
            width = u(0.02, 0.045) * (1.0 - 0.7 * s) * [1, 0]
            blocks.append(([FACE["hair"]], [20], np.concatenate([path - width, (path + width)[::-1]]),
                           STRAND_LIFT))

        # Landmarks, then every point through the head pose at once.
        nose, jaw = face["nose"], face["jaw"]
        marks = np.concatenate([eyes[0][4:], eyes[1][4:], nose[1:2], mouth[::2],  # MAFL
                                jaw, brows[0], brows[1], nose, eyes[0][:4], eyes[1][[2, 1, 0, 3]], mouth,
                                mouth_inner])  # dense
        points = np.concatenate([block[2] for block in blocks] + [marks])
        lift = np.concatenate([block[3] for block in blocks] + [face["mark_lift"]])
        shapes = [label for block in blocks for label in block[0]]
        counts = [n for block in blocks for n in block[1]]
        ends = list(itertools.accumulate(counts))  # where each shape's points end

        # Head pose. Yaw acts on a pseudo-3D head: a point gets the depth z = 0.6 a (1 - r^2) inside the
        # head ellipse (0 outside, so the outline only narrows) plus its lift (the nose sticks out), and
        # moves sideways by z sin(yaw). Then roll, scale and translation, and pixels x = (u + 1)(S - 1)/2.
        cos_yaw, sin_yaw = math.cos(p["yaw"]), math.sin(p["yaw"])
        scale = p["scale"]
        cos_r, sin_r = math.cos(p["roll"]) * scale, math.sin(p["roll"]) * scale
        room = 1.0 - 0.5 * scale if wild else 1.0  # wild: x, y in [-1, 1] keep the face centre in frame
        tx, ty = p["x"] * room, p["y"] * room
        x, y = points[:, 0], points[:, 1]
        z = 0.6 * a * np.maximum(1.0 - (x / a) ** 2 - (y / b) ** 2, 0.0) + lift
        x = x * cos_yaw + z * sin_yaw
        half = (size - 1) / 2
        pixels = np.empty_like(points)
        pixels[:, 0] = cos_r * x - sin_r * y + tx
        pixels[:, 1] = sin_r * x + cos_r * y + ty
        pixels *= half
        pixels += half
        marks = pixels[-len(marks):]
        keypoints = marks[:5] if self.annotation == "mafl" else marks[5:]

        lut = FACE_LUTS[scenic].copy()
        table = lut[:, :3]  # the colours, filled in below
        table[0] = [u(0.15, 0.85), u(0.15, 0.85), u(0.15, 0.85)]
        canvas = _background(rng, size, table, 0.25) if scenic else Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        corners = (pixels + 0.5).ravel().tolist()  # PIL's pixel i covers [i, i + 1), see the module docstring
        for label, stop, n in zip(shapes, ends, counts):
            draw.polygon(corners[2 * (stop - n):2 * stop], fill=label)
        if scenic and u() < 0.25:  # a foreign object in front of the face, near one of the MAFL points
            centre = marks[int(u(0, 5))] + [u(-0.3, 0.3) * half, u(-0.3, 0.3) * half]
            _polygon(draw, CIRCLE16 * [u(0.25, 0.6) * half * scale, u(0.25, 0.6) * half * scale] + centre,
                     FACE["occluder"])
            table[FACE["occluder"]] = [u(0.1, 0.9), u(0.1, 0.9), u(0.1, 0.9)]

        # Colours: the skin tone interpolates the SKIN palette, other parts use palettes and skin shades.
        k = p["skin"] * (len(SKIN) - 1)
        skin = SKIN[int(k)] + (SKIN[min(int(k) + 1, len(SKIN) - 1)] - SKIN[int(k)]) * (k - int(k))
        hair = _palette(HAIR, p["hair_colour"], p["hair_shade"])
        table[SKIN_LABELS] = skin * SKIN_SHADES
        table[FACE["hair"]], table[FACE["brow"]] = hair, hair * 0.8
        table[FACE["iris"]] = EYES[p["eye_colour"]]
        table[FACE["lips"]] = skin * [1.0, p["lip_tint"], p["lip_tint"]]
        hue = p["shirt"] * 6.0 + SHIRT_HUE  # a saturated colour of hue p["shirt"]
        table[FACE["shirt"]] = 0.25 + 0.2 * np.abs(hue % 6.0 - 3.0)

        # Shading: a lighting ramp across the image, and skin that darkens towards the face outline like a
        # lit ball, by r^2 = hx^2 + hy^2 with (hx, hy) = the pixel in the head ellipse's frame (its outline
        # at r = 1). hx = ca px + sa py, hy = -sb px + cb py for px = u - tx along x, py = v - ty along y;
        # r^2 is expanded so that (S,) vectors broadcast to (S, S) in three operations.
        axis = _axis(size)
        px, py = axis - tx, axis - ty
        ca, sa = cos_r / (scale ** 2 * a * cos_yaw), sin_r / (scale ** 2 * a * cos_yaw)
        cb, sb = cos_r / (scale ** 2 * b), sin_r / (scale ** 2 * b)
        r2 = (((ca * ca + sb * sb) * px * px)[None, :] + ((sa * sa + cb * cb) * py * py)[:, None]
              + (2.0 * (ca * sa - sb * cb) * py)[:, None] * px[None, :])
        angle, strength = u(0, 2 * math.pi), u(0.0, 0.35 if scenic else 0.15)
        light = (strength * math.cos(angle) * axis)[None, :] + (1 + strength * math.sin(angle) * axis)[:, None]
        labels = np.asarray(canvas).astype(np.intp)
        image, mask = _compose(labels, lut, (u(), u()), light, np.minimum(r2, 1.5, out=r2))
        inside = (keypoints >= 0) & (keypoints <= size - 1)
        visible = inside[:, 0] & inside[:, 1]
        return self._sample(image, mask, labels, keypoints, visible, with_labels)


# ---------------------------------------------------------------------------------------------------------
# Birds
# ---------------------------------------------------------------------------------------------------------
# Identity ("species"): shape and plumage; lengths in units of the body's half-length.
BIRD_IDENTITY = {
    "body_h": (0.50, 0.64), "body_w": (0.42, 0.55), "head_r": (0.34, 0.46), "head_x": (0.85, 1.05),
    "head_up": (0.55, 0.90), "beak_len": (0.15, 0.60), "beak_w": (0.07, 0.15), "beak_droop": (-0.1, 0.35),
    "eye_r": (0.06, 0.09), "tail_len": (0.6, 1.2), "tail_w": (0.16, 0.36), "tail_droop": (-0.2, 0.6),
    "leg_len": (0.18, 0.38), "wing_len": (1.0, 1.35), "wing_h": (0.28, 0.40), "main": len(PLUMAGE),
    "main_shade": (0.75, 1.15), "belly": len(PLUMAGE), "belly_line": (-0.5, 0.3), "breast": (0.0, 1.0),
    "cap": len(PLUMAGE), "cap_line": (0.1, 1.3), "throat": (0.0, 1.0), "wing": len(PLUMAGE),
    "wing_shade": (0.55, 1.0), "bars": (0.0, 1.0), "bar": len(PLUMAGE), "beak_colour": 4, "leg_colour": 3,
    "ring": (0.0, 1.0),
}
# Pose (view in radians: 0 = side view, > 0 turned towards the viewer) and the scene's random seed.
BIRD_POSE = {
    "facing_right": 2, "view": (-0.87, 0.87), "pitch": (0.15, 0.70), "head_turn": (-0.5, 0.5),
    "head_pitch": (-0.25, 0.3), "wing_raise": (0.0, 1.0), "stride": (-0.3, 0.3), "fill": (0.55, 0.85),
    "x": (-1.0, 1.0), "y": (-1.0, 1.0), "perch_tilt": (-0.25, 0.25), "scene": 2 ** 31,
}
BEAK_COLOURS = np.array([[0.15, 0.14, 0.13], [0.85, 0.70, 0.20], [0.90, 0.45, 0.15], [0.75, 0.65, 0.55]],
                        np.float32)
LEG_COLOURS = np.array([[0.2, 0.18, 0.16], [0.75, 0.55, 0.50], [0.80, 0.50, 0.20]], np.float32)
# Visibility compares parts: the part of every label (patterns belong to their part) and of each CUB landmark.
PART_OF_LABEL = np.arange(len(BIRD_LABELS))
for _pattern, _part in (("belly", "body"), ("breast", "body"), ("cap", "head"), ("throat", "head"),
                        ("eye ring", "head"), ("left wing bar", "left wing"),
                        ("right wing bar", "right wing")):
    PART_OF_LABEL[BIRD[_pattern]] = BIRD[_part]
CUB_PART = np.array([BIRD[name] for name in ("body", "beak", "body", "body", "head", "head", "left eye",
                                             "left leg", "left wing", "head", "right eye", "right leg",
                                             "right wing", "tail", "head")])
# Directions of the surface landmarks: back, belly, breast in the body's (axis, up) plane; crown, forehead,
# nape, throat in the head's (forward, up) plane. CUB_ORDER sorts [those 7, beak, left eye, left leg,
# left wing, right eye, right leg, right wing, tail] into CUB order.
BODY_DIRECTIONS = np.array([[-0.4, 1.0], [-0.1, -1.0], [0.8, -0.5]])
BODY_DIRECTIONS /= np.linalg.norm(BODY_DIRECTIONS, axis=1, keepdims=True)
HEAD_DIRECTIONS = np.array([[-0.15, 1.0], [0.75, 0.66], [-0.9, 0.2], [0.5, -0.85]])
HEAD_DIRECTIONS /= np.linalg.norm(HEAD_DIRECTIONS, axis=1, keepdims=True)
CUB_ORDER = [0, 7, 1, 2, 3, 4, 8, 9, 10, 5, 11, 12, 13, 14, 6]
# Wing outline in its own plane, (along, across) for unit length and height: a teardrop from the shoulder
# (rounded) to the tip (pointed).
WING = np.stack([0.5 - 0.5 * CIRCLE32[:, 0], CIRCLE32[:, 1] * (1.0 - 0.7 * (0.5 - 0.5 * CIRCLE32[:, 0]))], 1)
# Per-label constants: colours that never change, texture strengths, the foreground (the bird, not the perch).
BIRD_TABLE = np.zeros((len(BIRD_LABELS), 3), np.float32)
BIRD_TABLE[[BIRD["left eye"], BIRD["right eye"]]] = 0.03
BIRD_TABLE[BIRD["eye ring"]] = (0.95, 0.95, 0.9)
BIRD_TEXTURE = np.full(len(BIRD_LABELS), 0.07, np.float32)
BIRD_TEXTURE[:CLUTTER + 1] = 0.3  # background and clutter
BIRD_STREAKS = np.zeros(len(BIRD_LABELS), np.float32)
BIRD_STREAKS[[BIRD["left wing"], BIRD["right wing"], BIRD["tail"], BIRD["perch"]]] = 0.2
BIRD_COLOURED = [BIRD[name] for name in ("body", "head", "belly", "breast", "throat", "cap", "left wing bar",
                                         "right wing bar", "left wing", "right wing", "tail", "beak", "left leg",
                                         "right leg")]  # the labels each bird colours in this order
BIRD_FOREGROUND = (np.arange(len(BIRD_LABELS)) > BIRD["perch"]).astype(np.float32)
BIRD_LUT = _label_table(BIRD_TABLE, BIRD_TEXTURE, BIRD_STREAKS, np.zeros(len(BIRD_LABELS)), BIRD_FOREGROUND)


def _cross(a, b):
    """Cross product of two 3-vectors (np.cross is slow on tiny arrays; so is arithmetic on numpy scalars)."""
    (a0, a1, a2), (b0, b1, b2) = a.tolist(), b.tolist()
    return np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def _unit(v):
    return v / math.sqrt(v @ v)


class SyntheticBirds(_Synthetic):
    """Procedural perched birds with the 15 CUB parts and honest visibility; see the module docstring.

    A bird is a small 3D model (ellipsoid body, spherical head, conical beak, flat wings and tail, stick
    legs) seen by an orthographic camera and drawn back to front. World axes: x right, y up, z towards the
    viewer. `params(index)` returns every number a sample is drawn from, `render(params)` draws any dict.
    """

    def __init__(self, split="train", size=96, length=None, seed=0, normalize=True):
        super().__init__(split, size, length, seed, normalize, IMAGENET_MEAN, IMAGENET_STD)
        self.name = "synth-birds"
        self.landmark_names = list(CUB_NAMES)
        self.num_landmarks = len(CUB_NAMES)
        self.eye_indices = None
        self.metric = "pck"
        self.label_names = BIRD_LABELS

    def identity_params(self, identity):
        """Shape and plumage of bird `identity` (a global id, see identity()), a dict of numbers."""
        return dict(_identity_params(self.seed, 3, identity))

    def pose_params(self, index):
        """View, posture and scene of sample `index` (independent of the identity)."""
        return _draw_params(self._pose_rng(4, index), BIRD_POSE)

    def render(self, p, with_labels=False):
        """Draw the bird described by the parameter dict `p` (as returned by params()).

        p["facing_right"] (0 or 1) and p["view"] set the heading. Returns the sample dict without identity
        and index; with_labels=True adds "labels", the (S, S) int64 label map indexing `self.label_names`.
        """
        size = self.size[0]
        rng = np.random.default_rng(p["scene"])
        u = _uniforms(rng)
        # Bird frame in world coordinates: forward, up, and the bird's own left = up x forward.
        heading = p["view"] if p["facing_right"] else math.pi - p["view"]
        forward, up = np.array([math.cos(heading), 0.0, math.sin(heading)]), np.array([0.0, 1.0, 0.0])
        left = _cross(up, forward)
        ax = math.cos(p["pitch"]) * forward + math.sin(p["pitch"]) * up  # body axis, raised at the front
        ax_up = _cross(ax, left)
        body = np.array([ax, p["body_h"] * ax_up, p["body_w"] * left]).T.copy()  # columns = semi-axes, (3, 3)
        # Head frame: turned by head_turn about the vertical, pitched by head_pitch; hu = hf x hl.
        turn, tilt = p["head_turn"], p["head_pitch"]
        hf = math.cos(tilt) * (math.cos(turn) * forward + math.sin(turn) * left) + math.sin(tilt) * up
        hl = -math.sin(turn) * forward + math.cos(turn) * left
        hu = _cross(hf, hl)
        r = p["head_r"]
        head = p["head_x"] * ax + p["head_up"] * p["body_h"] * ax_up
        items = []  # (depth, [(label, (N, 2) world x, y), ...]): the parts, to be drawn from far to near

        # Body, its outline the projection of an ellipsoid with semi-axes A: the ellipse of the 2x2 block
        # of A A^T. Belly and breast patches: the outline cut by lines in the image plane, drawn right
        # after it so that they stay inside it.
        m = body[:2] @ body[:2].T
        l11 = math.sqrt(m[0, 0])
        l21 = m[1, 0] / l11
        outline = CIRCLE32 @ np.array([[l11, l21], [0.0, math.sqrt(max(m[1, 1] - l21 * l21, 1e-12))]])
        down, front = _unit(-ax_up[:2]), _unit(ax[:2])
        shapes = [(BIRD["body"], outline),
                  (BIRD["belly"], _cut(outline, down, p["belly_line"] * p["body_h"]))]
        if p["breast"] > 0.5:
            shapes.append((BIRD["breast"], _cut(_cut(outline, front, 0.35), down, -0.4 * p["body_h"])))
        items.append((0.0, shapes))

        # Head (a sphere) with cap, throat, eye rings and eyes. An eye is a disc tangent to the head,
        # drawn only when it faces the viewer (otherwise the head hides it). The head is drawn after the
        # body even when its centre is a little farther: it sits on the body's front end.
        outline = head[:2] + r * CIRCLE32
        crown, face = _unit(hu[:2] + 1e-9), _unit(hf[:2] + 1e-9)
        shapes = [(BIRD["head"], outline)]
        if p["cap_line"] < 0.9:
            shapes.append((BIRD["cap"], _cut(outline, crown, crown @ head[:2] + p["cap_line"] * r)))
        if p["throat"] > 0.5:
            throat = _cut(outline, -crown, -crown @ head[:2] + 0.3 * r)
            shapes.append((BIRD["throat"], _cut(throat, face, face @ head[:2] - 0.2 * r)))
        eyes = []
        ahead_up = 0.37 * hf + 0.3 * hu  # an eye's normal: this plus 0.88 hl towards its side
        for name, side in (("left eye", 1.0), ("right eye", -1.0)):
            normal = _unit(ahead_up + side * 0.88 * hl)  # on the side of the head, a little up
            eyes.append(head + r * normal)
            if normal[2] > 0.0:
                t1 = _unit(hu - (hu @ normal) * normal)
                disc = CIRCLE16 @ np.array([t1[:2], _cross(normal, t1)[:2]])
                if p["ring"] > 0.6:
                    shapes.append((BIRD["eye ring"], eyes[-1][:2] + 1.7 * p["eye_r"] * disc))
                shapes.append((BIRD[name], eyes[-1][:2] + p["eye_r"] * disc))
        items.append((max(head[2], 0.01), shapes))  # the head sits on the body: never behind it

        # Beak: a cone along hf, drooping along -hu; its projection is the base ellipse plus the triangle
        # from the tip to the two base points farthest from the projected axis.
        base = head + 0.8 * r * hf
        tip = head + (r + p["beak_len"]) * hf - p["beak_droop"] * p["beak_len"] * hu
        rim = base[:2] + p["beak_w"] * CIRCLE16 @ np.array([hu[:2], hl[:2]])
        spread = rim @ np.array([base[1] - tip[1], tip[0] - base[0]])
        beak = base + 0.6 * (tip - base)
        triangle = np.array([tip[:2], rim[spread.argmax()], rim[spread.argmin()]])
        items.append((beak[2], [(BIRD["beak"], rim), (BIRD["beak"], triangle)]))

        # Wings: flat teardrops hinged at the shoulders in the plane of (wa, wu), the tip backwards; a few
        # birds raise them. Bars are strips across the wing, in the wing's own 2D coordinates.
        lift = max(p["wing_raise"] - 0.8, 0.0) / 0.2 * 0.9 - 0.12  # radians; 80% keep the wings folded
        wa = -math.cos(lift) * ax + math.sin(lift) * ax_up
        wu = math.sin(lift) * ax + math.cos(lift) * ax_up
        plane = np.array([wa[:2], wu[:2]])  # wing 2D (along, across) -> world x, y
        wing_shapes = [WING * [p["wing_len"], p["wing_h"]] @ plane]
        if p["bars"] > 0.5:
            for f0 in (0.3, 0.5):
                f1 = f0 + 0.07
                h0, h1 = (p["wing_h"] * math.sqrt(1 - (1 - 2 * f) ** 2) * (1 - 0.7 * f) for f in (f0, f1))
                wing_shapes.append(np.array([[f0 * p["wing_len"], -h0], [f1 * p["wing_len"], -h1],
                                             [f1 * p["wing_len"], h1], [f0 * p["wing_len"], h0]]) @ plane)
        wings = []
        middle = 0.45 * ax + 0.25 * p["body_h"] * ax_up  # between the shoulders
        for name, side in (("left wing", 1.0), ("right wing", -1.0)):
            shoulder = middle + side * 0.85 * p["body_w"] * left
            wings.append(shoulder + 0.4 * p["wing_len"] * wa)
            items.append((wings[-1][2], [(BIRD[name if k == 0 else name + " bar"], shoulder[:2] + shape)
                                         for k, shape in enumerate(wing_shapes)]))

        # Tail: a wedge in the body's vertical plane plus a fan in the horizontal one, so every view shows it.
        ta = -math.cos(p["tail_droop"]) * ax - math.sin(p["tail_droop"]) * ax_up
        tu = -math.sin(p["tail_droop"]) * ax + math.cos(p["tail_droop"]) * ax_up
        root, end = -0.8 * ax[:2], (-0.8 * ax + p["tail_len"] * ta)[:2]
        tail = -0.8 * ax + 0.55 * p["tail_len"] * ta
        width = np.array([[0.1], [p["tail_w"]], [-p["tail_w"]], [-0.1]])
        ends = np.array([root, end, end, root])
        items.append((tail[2], [(BIRD["tail"], ends + width * tu[:2]),
                                (BIRD["tail"], ends + width * left[:2])]))

        # Legs: straight down from inside the body to the perch, one a stride ahead of the other. They are
        # drawn before everything else: they hang below the body, whose outline hides their tops.
        bottom = -math.sqrt(body[1] @ body[1])  # the body's lowest point (world y)
        legs = []
        apart = 0.35 * p["body_w"] * left + p["stride"] * forward  # from the body's centre to the left hip
        for name, side in (("left leg", 1.0), ("right leg", -1.0)):
            hip = side * apart
            (x, _, z), foot_y, toe = hip.tolist(), bottom - p["leg_len"], 0.2 * float(forward[0])
            legs.append(np.array([x, foot_y + 0.3 * p["leg_len"], z]))
            items.append((z - 10.0, [
                (BIRD[name], np.array([[x - 0.035, 0.5 * bottom], [x - 0.035, foot_y], [x + 0.035, foot_y],
                                       [x + 0.035, 0.5 * bottom]])),
                (BIRD[name], np.array([[x + toe, foot_y], [x, foot_y + 0.04], [x - 0.6 * toe, foot_y],
                                       [x, foot_y - 0.02]]))]))

        # Landmarks: back, belly, breast 0.85 of the way out along directions d in the body's (axis, up)
        # plane; crown, forehead, nape, throat likewise in the head's (forward, up) plane; then the rest.
        # These surface points count as facing the viewer while their surface normal is at most 25 degrees
        # past the silhouette (normal z > -sin 25 deg), as CUB's parts are patches rather than points; the
        # normal of the ellipsoid at A d is A^-T d, i.e. d / (1, body_h) in the body's frame.
        on_body = 0.85 * BODY_DIRECTIONS @ body[:, :2].T  # (3, 3)
        normals = (BODY_DIRECTIONS / [1.0, p["body_h"]]) @ np.array([ax, ax_up])
        on_head = HEAD_DIRECTIONS @ np.array([hf, hu])  # (4, 3) unit directions = normals
        others = [beak, eyes[0], legs[0], wings[0], eyes[1], legs[1], wings[1], tail]
        marks = np.concatenate([on_body, head + 0.85 * r * on_head, others])[CUB_ORDER]
        facing = np.concatenate([normals[:, 2] > -0.42 * np.sqrt((normals ** 2).sum(1)),
                                 on_head[:, 2] > -0.42, np.ones(8, bool)])[CUB_ORDER]

        # Framing: world (x, y) -> normalised image (s x + tx, -s y + ty), the bird's bounding box spanning
        # `fill` of the image at a random place inside it; then pixels (u + 1)(S - 1) / 2.
        items.sort(key=lambda item: item[0])
        shapes = [shape for _, group in items for shape in group]
        counts = [len(points) for _, points in shapes]
        points = np.concatenate([points for _, points in shapes] + [marks[:, :2]])
        x, y = points[:-15, 0], points[:-15, 1]  # (reductions along axis 0 of an (N, 2) array are slow)
        low, high = np.array([x.min(), y.min()]), np.array([x.max(), y.max()])
        s = 2.0 * p["fill"] / max(high - low)
        room = 1.0 - s * (high - low) / 2
        tx, ty = p["x"] * room[0] - s * (low[0] + high[0]) / 2, -p["y"] * room[1] + s * (low[1] + high[1]) / 2
        half = (size - 1) / 2
        pixels = points * [s * half, -s * half] + [tx * half + half, ty * half + half]
        keypoints = pixels[-15:]

        lut = BIRD_LUT.copy()
        table = lut[:, :3]  # the colours, filled in below
        table[0] = [u(0.2, 0.7), u(0.3, 0.8), u(0.2, 0.8)]
        canvas = _background(rng, size, table, 0.15)
        draw = ImageDraw.Draw(canvas)
        # The perch: a band whose top edge passes just under the feet (the leg landmarks are 0.3 leg
        # lengths above them), slightly tilted.
        foot_x, foot_y = (keypoints[7] + keypoints[11]) / 2 + [0.0, 0.32 * p["leg_len"] * s * half]
        thick, xs = u(0.04, 0.08) * size, np.array([-0.1 * size, 1.1 * size])
        ys = foot_y + p["perch_tilt"] * (xs - foot_x)
        _polygon(draw, np.array([[xs[0], ys[0]], [xs[1], ys[1]], [xs[1], ys[1] + thick],
                                 [xs[0], ys[0] + thick]]), BIRD["perch"])
        corners = (pixels + 0.5).ravel().tolist()  # PIL's pixel i covers [i, i + 1), see the module docstring
        for (label, _), stop, n in zip(shapes, itertools.accumulate(counts), counts):
            if n >= 3:  # a cut patch can be empty
                draw.polygon(corners[2 * (stop - n):2 * stop], fill=label)
        labels = np.asarray(canvas).astype(np.intp)

        # Visibility: inside the image, the topmost part there is the landmark's part, surface points face us.
        pixel = np.rint(keypoints).astype(np.intp)
        inside = (pixel >= 0) & (pixel <= size - 1)
        inside = inside[:, 0] & inside[:, 1]
        pixel = np.minimum(np.maximum(pixel, 0), size - 1)
        visible = inside & facing & (PART_OF_LABEL[labels[pixel[:, 1], pixel[:, 0]]] == CUB_PART)

        main, belly = _palette(PLUMAGE, p["main"], p["main_shade"]), PLUMAGE[p["belly"]]
        wing = _palette(PLUMAGE, p["wing"], p["wing_shade"])
        table[BIRD_COLOURED] = (
            main, main, belly, 0.5 * (belly + main), np.minimum(belly * 1.1, 1.0), PLUMAGE[p["cap"]],
            PLUMAGE[p["bar"]], PLUMAGE[p["bar"]], wing, wing, wing * 0.85, BEAK_COLOURS[p["beak_colour"]],
            LEG_COLOURS[p["leg_colour"]], LEG_COLOURS[p["leg_colour"]])
        if p["ring"] > 0.8:  # a yellow eye ring instead of a white one
            table[BIRD["eye ring"]] = (0.95, 0.8, 0.3)
        table[BIRD["perch"]] = u(0.25, 0.5) * np.array([1.0, 0.8, 0.6])
        axis, angle, strength = _axis(size), u(0, 2 * math.pi), u(0.0, 0.3)
        light = (strength * math.cos(angle) * axis)[None, :] + (1 + strength * math.sin(angle) * axis)[:, None]
        image, mask = _compose(labels, lut, (u(), u()), light)
        return self._sample(image, mask, labels, keypoints, visible, with_labels)


# ---------------------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------------------
def contact_sheet(dataset, path, n=16, indices=None, columns=None, show_mask=False):
    """Save a PNG grid of samples with their landmarks: filled dots = visible, hollow circles = invisible.

    Works with any dataset of data.py. `indices` picks samples (default: the first n); `show_mask` outlines
    the foreground mask. Each cell is titled with the sample's index and identity.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    indices = list(range(min(n, len(dataset)))) if indices is None else list(indices)
    columns = columns or math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / columns)
    figure = Figure(figsize=(2.2 * columns, 2.3 * rows), dpi=110)
    FigureCanvasAgg(figure)
    colours = colormaps["hsv"](np.linspace(0, 1, dataset.num_landmarks, endpoint=False))  # (K, 4)
    for cell, index in enumerate(indices):
        sample = dataset[index]
        image = sample["image"]
        if getattr(dataset, "normalize", True):
            image = image * torch.tensor(dataset.std).view(3, 1, 1) + torch.tensor(dataset.mean).view(3, 1, 1)
        axes = figure.add_subplot(rows, columns, cell + 1)
        # imshow puts pixel centres at integer coordinates, like the keypoints
        axes.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        if show_mask and "mask" in sample:
            axes.contour(sample["mask"][0].numpy(), levels=[0.5], colors="white", linewidths=0.6)
        points, visible = sample["keypoints"].numpy(), sample["visible"].numpy().astype(bool)
        dot = 7 if len(points) <= 15 else 3
        axes.scatter(points[visible, 0], points[visible, 1], s=dot, c=colours[visible], edgecolors="black",
                     linewidths=0.4)
        axes.scatter(points[~visible, 0], points[~visible, 1], s=dot * 1.5, facecolors="none",
                     edgecolors=colours[~visible], linewidths=0.8)
        axes.set_title(f"#{index}  id {sample['identity']}", fontsize=7)
        axes.set_axis_off()
    figure.suptitle(f"{dataset.name}: {len(indices)} samples, {dataset.num_landmarks} landmarks", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


# =========================================================================================================
# 3. Real datasets in their usual on-disk layouts
#
# Loaders of the real landmark datasets, read from the layouts people already have on disk.
#
# Every loader is a torch Dataset whose `dataset[i]` is the sample dict of SPEC.md (image (3, 96,
# 96), keypoints (K, 2) in output pixels with pixel centres at integers, visible (K,), identity,
# index) and which carries the attributes SPEC.md lists. File formats and the evaluation
# preprocessing are those of PROTOCOL.md sections 3 and 6 (numbers from the DVE reference code).
#
# Geometry, one rule for every loader
# -----------------------------------
# Each loader reduces its preprocessing to ONE axis-aligned map per sample,
#     out = scale * src + offset        (per axis; pixel centres at integer coordinates),
# and sends the keypoints through the formula and the image through a single bilinear resampling
# whose sampling grid is the inverse of that map (`_resample`). Image content and keypoints thus
# agree exactly, whatever the map; chained steps (300W: scale, window, resize, crop) are resampled
# once, not three times (same geometry, less blur). Outside the source image is black, as in 300W.
# Two kinds of maps are used:
# - protocol crops (CelebA/MAFL, AFLW_M, AFLW_R, 300W, and our own crops for wild CelebA and cats):
#   out = (src - (left, top)) * resize / window - crop, the reference formula (`kp * 136/178`).
#   It scales about the centre of pixel (0, 0); a plain PIL resize of the window would scale about
#   its outer corner, out = (src + 0.5) * s - 0.5, a constant 0.5 * (1 - s) px away (0.12 px for
#   178 -> 136). We keep the reference labels and resample the image to match them.
# - whole-image resizes (CUB, CSVKeypoints, ImageFolderUnlabelled): image edges land on output
#   edges, as in PIL's own resize: out = (src + 0.5) * s - 0.5.
#
# Splits and choices of ours
# --------------------------
# - A dataset without a validation split gets one held out of its training list: a shuffle with the
#   fixed seed HOLDOUT_SEED picks `val_size` images, and train keeps the rest in file order.
# - `visible` is the annotation's flag; a point that falls outside the crop keeps it (the protocol
#   still scores it). The coordinates of an invisible part are meaningless (CUB stores 0, 0).
# - A user mistake (missing folder or file, malformed row, wrong row count, unreadable image) raises
#   DatasetError with one sentence naming the expected path and format. Annotations are checked
#   when the dataset is built; images when they are loaded.
# =========================================================================================================
# DatasetError is listed so that, until the merge, data.DatasetError is the class raised here.


HOLDOUT_SEED = 0  # seed of every held-out validation (and cat test) subset: fixed, so runs agree
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAFL_LANDMARKS = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")
# "left" and "right" as seen in the image (CelebA's lefteye has the smaller x), as in 300W below.
W300_LANDMARKS = tuple(f"{part} {i + 1}" for part, count in (
    ("jaw", 17), ("left brow", 5), ("right brow", 5), ("nose bridge", 4), ("nose base", 5),
    ("left eye", 6), ("right eye", 6), ("outer lip", 12), ("inner lip", 8)) for i in range(count))
CUB_PARTS = ("back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
             "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat")
CAT_KEEP = (0, 1, 2, 3, 5, 6, 8)  # of the 9 cat points, drop the ear tips 4 and 7 (Rahaman et al.)
CAT_LANDMARKS = ("left eye", "right eye", "mouth", "left ear 1", "left ear 3", "right ear 1",
                 "right ear 3")
CELEBA_WILD_MARGIN = 1.25  # our choice: square side = 1.25 x the longer side of CelebA's face box
CAT_MARGIN = 1.5  # our choice: square side = 1.5 x the longer side of the 9 cat points' box

CELEBA_LIST = "a row count, a header line, then rows '<image> v1 ... v{}'"
PARTITION_FORMAT = "rows '<image> 0|1|2' (CelebA's list_eval_partition.txt)"
IDENTITY_FORMAT = "rows '<image> <identity>' (CelebA's identity_CelebA.txt)"
MAFL_FORMAT = "one CelebA image name per row (MAFL list)"
MTFL_FORMAT = "rows '<path> x1 ... x5 y1 ... y5' with 1-based pixels, optionally 4 attributes after"
AFLW_CSV_FORMAT = "a CSV with a header naming image_file, set, crop_file, then x1, y1, ..., x5, y5"
PTS_FORMAT = "a 300W .pts file: 'version: 1', 'n_points: 68', '{', 68 lines 'x y', '}'"
CAT_FORMAT = "a .cat file '9 x1 y1 ... x9 y9'"


# ---------------------------------------------------------------------------------------------
# Geometry: one affine map per sample, applied alike to keypoints and image
# ---------------------------------------------------------------------------------------------
def _crop_map(left, top, width, height, resize=136, crop=20):
    """Protocol crop: window at (left, top) of width x height source px -> resize px -> `crop` px
    removed per border. Returns (scale, offset), each (2,), of out = scale * src + offset."""
    scale = np.array([resize / width, resize / height])
    return scale, -np.array([left, top]) * scale - crop


def _box_map(left, top, right, bottom, out_w, out_h):
    """Edge-aligned resize of the source box [left, right] x [top, bottom] (pixel edges) onto the
    whole output, as PIL resizes: out = (src + 0.5 - left) * s - 0.5."""
    scale = np.array([out_w / (right - left), out_h / (bottom - top)])
    return scale, (0.5 - np.array([left, top])) * scale - 0.5


def _resample(image, scale, offset, size):
    """Sample the PIL image through out = scale * src + offset into an image of `size` (H, W).

    PIL's resize(box=...) reads output pixel u from source position box_left + (u + 0.5) / s - 0.5;
    making that equal to (u - offset) / scale gives box_left = 0.5 - (0.5 + offset) / scale. PIL
    wants the box inside the image, so first cut a patch around it with Image.crop, which fills the
    area outside the image with black. The patch keeps a margin for the antialiasing filter, but not
    beyond the image, so edge pixels are filtered as in a plain resize.
    """
    out_h, out_w = size
    left, top = 0.5 - (0.5 + offset) / scale  # box corner, in source pixel-edge coordinates
    right, bottom = left + out_w / scale[0], top + out_h / scale[1]
    margin = math.ceil(1 / min(scale.min(), 1.0)) + 1  # filter support when shrinking, plus one
    x0 = min(math.floor(left), max(math.floor(left) - margin, 0))
    y0 = min(math.floor(top), max(math.floor(top) - margin, 0))
    x1 = max(math.ceil(right), min(math.ceil(right) + margin, image.width))
    y1 = max(math.ceil(bottom), min(math.ceil(bottom) + margin, image.height))
    patch = image.crop((x0, y0, x1, y1))
    return patch.resize((out_w, out_h), Image.BILINEAR,
                        box=(left - x0, top - y0, right - x0, bottom - y0))


# ---------------------------------------------------------------------------------------------
# Reading files: every problem becomes one DatasetError sentence naming the path and the format
# ---------------------------------------------------------------------------------------------
def _bad(path, fmt, problem):
    return DatasetError(f"expected {path} to hold {fmt}, but {problem}")


def _folder(path, what):
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetError(f"expected {what} at {path}, but there is no such folder")
    return path


def _lines(path, fmt):
    """Non-blank lines of a text file as (line number, stripped text)."""
    if not path.is_file():
        raise DatasetError(f"expected {fmt} at {path}, but there is no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _bad(path, fmt, f"it cannot be read as text ({error})") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _split(lines, path, fmt, columns=None, sep=None):
    """Fields of each line (whitespace or CSV separated); `columns`: the allowed field count(s)."""
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


def _numbers(rows, path, fmt, start, stop):
    """Fields start:stop of every row as a float array (len(rows), stop - start)."""
    try:
        return np.array([fields[start:stop] for _, fields in rows], dtype=np.float64).reshape(
            len(rows), stop - start)
    except ValueError:
        for number, fields in rows:  # find the culprit for the message
            try:
                [float(value) for value in fields[start:stop]]
            except ValueError:
                problem = f"line {number} has a non-number: {' '.join(fields)!r}"
                raise _bad(path, fmt, problem) from None
        raise


def _counted_list(path, num_values):
    """CelebA's Anno lists: line 1 the row count, line 2 the column names, then '<image> v1 ... vn'.
    Returns ({image name: row}, values (N, num_values))."""
    fmt = CELEBA_LIST.format(num_values)
    lines = _lines(path, fmt)
    if not lines or not lines[0][1].isdigit():
        raise _bad(path, fmt, "its first line is not the row count")
    rows = _split(lines[2:], path, fmt, 1 + num_values)
    if int(lines[0][1]) != len(rows):
        raise _bad(path, fmt, f"its first line announces {lines[0][1]} rows and it has {len(rows)}")
    return _keyed(rows, path, fmt, num_values)


def _keyed(rows, path, fmt, num_values):
    """Rows '<name> v1 ... vn' as ({name: row}, values (N, num_values))."""
    index = {fields[0]: i for i, (_, fields) in enumerate(rows)}
    return index, _numbers(rows, path, fmt, 1, 1 + num_values)


def _rows_of(names, index, path):
    """Row numbers of `names` in a list indexed by _keyed; every name must be there."""
    missing = next((name for name in names if name not in index), None)
    if missing is not None:
        raise DatasetError(f"expected {path} to have a row for every image used, but {missing} "
                           f"has none")
    return np.array([index[name] for name in names], dtype=np.int64)


def _loadmat(path, fmt, keys):
    import scipy.io  # lazily: scipy is only needed for the .mat files of AFLW_R and 300W
    if not path.is_file():
        raise DatasetError(f"expected {fmt} at {path}, but there is no such file")
    try:
        mat = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, scipy.io.matlab.MatReadError) as error:
        raise _bad(path, fmt, f"it is not a readable .mat file ({error})") from None
    missing = [key for key in keys if key not in mat]
    if missing:
        raise _bad(path, fmt, f"it has no variable {missing[0]!r}")
    return mat


def _holdout(n, split, val_size, source, test_size=0):
    """Indices of `split` in a list of n items. A list from the dataset's own test files
    (split "test", test_size 0) is used whole. Otherwise a fixed-seed shuffle gives test_size items
    to test, the next val_size to val, and train keeps the rest (in file order)."""
    if split == "test" and not test_size:
        return np.arange(n)
    if val_size < 0 or val_size + test_size >= n:
        sizes = f"val_size={val_size}" + (f" and test_size={test_size}" if test_size else "")
        raise DatasetError(f"{source} lists {n} images, too few to hold out {sizes}; pass smaller "
                           f"sizes")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    parts = {"test": order[:test_size], "val": order[test_size:test_size + val_size],
             "train": order[test_size + val_size:]}
    return np.sort(parts[split])


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def _expect_size(path, actual, expected):
    if tuple(actual) != tuple(expected):
        raise DatasetError(f"expected {path} to be a {expected[0]}x{expected[1]} image (width x "
                           f"height), as its annotations assume, but it is {actual[0]}x{actual[1]}")


def _open_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:  # missing file, unknown format, truncated data
        raise DatasetError(f"expected a readable image at {path}, but it could not be read "
                           f"({error})") from None


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _size_pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


# ---------------------------------------------------------------------------------------------
# Shared dataset machinery
# ---------------------------------------------------------------------------------------------
class _LandmarkDataset(Dataset):
    """Per-sample arrays filled by a subclass through _setup(); _geometry() gives each sample's map
    (the whole image resized to `size`, edge-aligned, unless a subclass crops)."""

    name = ""
    mean, std = FACE_MEAN, FACE_STD
    size = (96, 96)
    landmark_names = ()
    eye_indices = None
    metric = None
    has_mask = False
    poses_per_identity = 1

    def _setup(self, split, normalize, paths, keypoints, source, visible=None, identity=None):
        """paths: N image paths (kept as str: cheap to build for CelebA's 200k images and to send
        to DataLoader workers); keypoints: (N, K, 2) source pixels, 0-based, pixel centres at
        integers; visible: (N, K) bool (all True if None); identity: (N,) int (all -1 if None)."""
        if len(paths) == 0:
            raise DatasetError(f"found no {split!r} images of {self.name} in {source}")
        n = len(paths)
        self.split, self.normalize, self.paths = split, normalize, [str(p) for p in paths]
        self.keypoints = np.asarray(keypoints, dtype=np.float64).reshape(n, -1, 2)
        k = self.keypoints.shape[1]
        self.visible = np.ones((n, k), bool) if visible is None else np.asarray(visible, bool)
        self.identity = np.full(n, -1) if identity is None else np.asarray(identity, np.int64)
        self.landmark_names = list(self.landmark_names)

    @property
    def num_landmarks(self):
        return len(self.landmark_names)

    def __len__(self):
        return len(self.paths)

    def _geometry(self, index, path, width, height):
        """(scale, offset), each (2,), of the map out = scale * src + offset for sample `index`."""
        return _box_map(0, 0, width, height, *self.size[::-1])

    def __getitem__(self, index):
        path = self.paths[index]
        image = _open_rgb(path)
        scale, offset = self._geometry(index, path, *image.size)
        image = _resample(image, scale, offset, self.size)
        pixels = TF.pil_to_tensor(image).float() / 255  # (3, H, W) in [0, 1]
        if self.normalize:
            pixels = TF.normalize(pixels, self.mean, self.std)
        keypoints = self.keypoints[index] * scale + offset  # (K, 2): the image's own map
        return {"image": pixels,
                "keypoints": torch.from_numpy(keypoints.astype(np.float32)),
                "visible": torch.from_numpy(self.visible[index].copy()),
                "identity": int(self.identity[index]),
                "index": int(index)}


# ---------------------------------------------------------------------------------------------
# Faces: CelebA, MAFL, AFLW (two versions), 300W
# ---------------------------------------------------------------------------------------------
class CelebA(_LandmarkDataset):
    """CelebA (Liu et al. 2015), the self-supervised training set of every face paper.

    root holds Img/, Anno/, Eval/ and MAFL/. Split k of `Eval/list_eval_partition.txt` (train 0,
    val 1, test 2) minus every image of both MAFL lists, so no MAFL image is seen in pretraining.
    Keypoints (5, MAFL order) come from the landmark list although pretraining ignores them;
    identity from `Anno/identity_CelebA.txt` when that file is there, else -1.
    - aligned (default): `Img/img_align_celeba/` (or `Img/img_align_celeba_hq/`), 178x218 images,
      `Anno/list_landmarks_align_celeba.txt`; crop top 30, left 0, 178x178 -> 136 -> crop 20 -> 96.
    - wild=True: `Img/img_celeba/`, `Anno/list_bbox_celeba.txt`, `Anno/list_landmarks_celeba.txt`.
      Our choice (no reference exists): a square of side 1.25 x the longer side of the face box,
      centred on the box, then 136 -> crop 20 -> 96 as aligned; this gives faces about the aligned
      scale (for 000001.jpg the eye distance is 27 px at 96 vs about 28 px aligned).
    """

    name = "celeba"
    landmark_names = MAFL_LANDMARKS
    eye_indices = (0, 1)
    metric = "iod"

    def __init__(self, root, split="train", normalize=True, wild=False):
        _check_split(split)
        root = _folder(root, "the CelebA folder (with Img/, Anno/, Eval/ and MAFL/)")
        mafl = set(_mafl_names(root, "training.txt")) | set(_mafl_names(root, "testing.txt"))
        partition = _table(root / "Eval/list_eval_partition.txt", PARTITION_FORMAT, 2)
        wanted = str(SPLITS.index(split))
        for number, (name, part) in partition:
            if part not in ("0", "1", "2"):
                raise _bad(root / "Eval/list_eval_partition.txt", PARTITION_FORMAT,
                           f"line {number} has partition {part!r}")
        names = [name for _, (name, part) in partition if part == wanted and name not in mafl]
        if wild:
            self.name = "celeba_wild"
        self._load(root, split, normalize, names, wild)

    def _load(self, root, split, normalize, names, wild):
        """Look the names up in CelebA's lists (aligned or wild) and fill the per-sample arrays."""
        self.wild = wild
        if wild:
            image_dir = _folder(root / "Img/img_celeba", "CelebA's in-the-wild images")
            landmark_file = root / "Anno/list_landmarks_celeba.txt"
            box_index, boxes = _counted_list(root / "Anno/list_bbox_celeba.txt", 4)
            self.boxes = boxes[_rows_of(names, box_index, root / "Anno/list_bbox_celeba.txt")]
        else:
            image_dir = next((root / "Img" / sub for sub in ("img_align_celeba",
                                                             "img_align_celeba_hq")
                              if (root / "Img" / sub).is_dir()), None)
            if image_dir is None:
                raise DatasetError(f"expected CelebA's aligned images at "
                                   f"{root / 'Img/img_align_celeba'} (or img_align_celeba_hq), "
                                   f"but there is no such folder")
            landmark_file = root / "Anno/list_landmarks_align_celeba.txt"
        index, landmarks = _counted_list(landmark_file, 10)
        keypoints = landmarks[_rows_of(names, index, landmark_file)]
        identity = None
        identity_file = root / "Anno/identity_CelebA.txt"
        if identity_file.is_file():  # optional: not every CelebA copy has it
            index, ids = _keyed(_table(identity_file, IDENTITY_FORMAT, 2), identity_file,
                                IDENTITY_FORMAT, 1)
            identity = ids[_rows_of(names, index, identity_file), 0]
        self._setup(split, normalize, [os.path.join(image_dir, name) for name in names],
                    keypoints, source=root, identity=identity)

    def _geometry(self, index, path, width, height):
        if not self.wild:
            _expect_size(path, (width, height), (178, 218))
            return _crop_map(0, 30, 178, 178)
        x, y, w, h = self.boxes[index]
        side = CELEBA_WILD_MARGIN * max(w, h)
        return _crop_map(x + w / 2 - side / 2, y + h / 2 - side / 2, side, side)


def _mafl_names(root, list_name):
    return [fields[0] for _, fields in _table(root / "MAFL" / list_name, MAFL_FORMAT)]


class MAFL(CelebA):
    """MAFL (Zhang et al. 2014): 19,000 training and 1,000 test faces of aligned CelebA.

    root is the CelebA folder (MAFL/training.txt, MAFL/testing.txt, names in column 0; landmarks
    from Anno/list_landmarks_align_celeba.txt). test = testing.txt in file order (CelebA order, as
    the matching benchmark expects); val = `val_size` images held out of training.txt with the
    fixed seed HOLDOUT_SEED, so epochs are chosen without the test set; train = the rest.
    Preprocessing as aligned CelebA: top 30, left 0, 178x178 -> 136 -> crop 20 -> 96.
    """

    name = "mafl"

    def __init__(self, root, split="train", normalize=True, val_size=1000):
        _check_split(split)
        root = _folder(root, "the CelebA folder (with Img/, Anno/ and MAFL/)")
        list_name = "testing.txt" if split == "test" else "training.txt"
        names = _mafl_names(root, list_name)
        names = [names[i] for i in _holdout(len(names), split, val_size, root / "MAFL" / list_name)]
        self._load(root, split, normalize, names, wild=False)


class AFLW_M(_LandmarkDataset):
    """AFLW, MTFL version (5 points): train on Thewlis et al.'s cropped AFLW, test on MTFL's AFLW.

    - train/val: `aflw_cropped/facedata_cropped.csv`, rows whose `set` is 1 (10,122); columns found
      by header name (the reference reads the points at columns 4-13, i.e. the file may start with
      an unnamed index column); points are the 10 columns after crop_file, x1, y1, ..., x5, y5;
      images `aflw_cropped/cropped/<crop_file>`. val = `val_size` rows held out (HOLDOUT_SEED).
    - test: `MTFL/testing.txt`, '<path> x1..x5 y1..y5' (MTFL appends 4 attribute columns, which
      are ignored; Windows backslashes in paths are accepted); images under `MTFL/`.
    Both are 1-based: PROTOCOL.md section 3 says so for AFLW_M and the reference subtracts 1 from
    both files. Preprocessing: 150x150 image -> 136 -> crop 20, points (p - 1) * 136/150 - 20.
    """

    name = "aflw_m"
    landmark_names = MAFL_LANDMARKS
    eye_indices = (0, 1)
    metric = "iod"

    def __init__(self, root, split="train", normalize=True, val_size=1000):
        _check_split(split)
        root = _folder(root, "the AFLW folder (with aflw_cropped/ and MTFL/)")
        if split == "test":
            path = root / "MTFL/testing.txt"
            rows = _table(path, MTFL_FORMAT, {11, 15})
            paths = [root / "MTFL" / fields[0].replace("\\", "/") for _, fields in rows]
            xs_ys = _numbers(rows, path, MTFL_FORMAT, 1, 11).reshape(-1, 2, 5)  # x1..x5, y1..y5
            keypoints = xs_ys.transpose(0, 2, 1)  # (N, 5, 2)
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
            in_set = _numbers(rows, path, AFLW_CSV_FORMAT, header.index("set"),
                              header.index("set") + 1)[:, 0] == 1
            rows = [rows[i] for i in np.flatnonzero(in_set)]
            rows = [rows[i] for i in _holdout(len(rows), split, val_size, f"{path} (set 1)")]
            paths = [root / "aflw_cropped/cropped" / fields[first - 1] for _, fields in rows]
            keypoints = _numbers(rows, path, AFLW_CSV_FORMAT, first, first + 10).reshape(-1, 5, 2)
        self._setup(split, normalize, paths, keypoints - 1, source=path)  # 1-based -> 0-based

    def _geometry(self, index, path, width, height):
        _expect_size(path, (width, height), (150, 150))
        return _crop_map(0, 0, 150, 150)


class AFLW_R(_LandmarkDataset):
    """AFLW, "recropped" version of Thewlis et al. (5 points; 10,122 train, 2,991 test).

    root holds `aflw_{train,test}_images.txt` (names relative to `output/`) and
    `aflw_{train,test}_keypoints.mat` with `gt` (N, 5, 2) stored as (y, x) and `hw` (N, 2) = (h, w).
    val = `val_size` images held out of the training list with HOLDOUT_SEED (the reference held out
    its last 10%). Preprocessing: resize to 136x136 ignoring aspect, points times 136 / (w, h),
    crop 20; each image must have the (h, w) its row in the .mat says.
    """

    name = "aflw_r"
    landmark_names = MAFL_LANDMARKS
    eye_indices = (0, 1)
    metric = "iod"

    def __init__(self, root, split="train", normalize=True, val_size=1000):
        _check_split(split)
        root = _folder(root, "the AFLW_R folder (aflw_*_images.txt, aflw_*_keypoints.mat, output/)")
        subset = "test" if split == "test" else "train"
        list_path = root / f"aflw_{subset}_images.txt"
        mat_path = root / f"aflw_{subset}_keypoints.mat"
        names = [line for _, line in _lines(list_path, "one image path (under output/) per row")]
        mat_format = "'gt' (N, 5, 2) keypoints as (y, x) and 'hw' (N, 2) image heights and widths"
        mat = _loadmat(mat_path, mat_format, ("gt", "hw"))
        gt, hw = np.asarray(mat["gt"], np.float64), np.asarray(mat["hw"], np.float64)
        if gt.shape != (len(names), 5, 2) or hw.shape != (len(names), 2):
            raise _bad(mat_path, mat_format, f"gt is {gt.shape} and hw is {hw.shape} for the "
                                             f"{len(names)} images of {list_path.name}")
        keep = _holdout(len(names), split, val_size, list_path)
        self.hw = hw[keep]
        self._setup(split, normalize, [root / "output" / names[i] for i in keep],
                    gt[keep][..., ::-1], source=root)  # (y, x) -> (x, y)

    def _geometry(self, index, path, width, height):
        h, w = self.hw[index]
        _expect_size(path, (width, height), (round(w), round(h)))
        return _crop_map(0, 0, w, h)


class W300(_LandmarkDataset):
    """300W (Sagonas et al. 2013), 68 points, with the split of Ren et al. 2014.

    root holds `Bounding Boxes/bounding_boxes_<subset>.mat` and the images with their `.pts` files
    in afw/, helen/{trainset,testset}/, lfpw/{trainset,testset}/, ibug/. train = afw + helen train +
    lfpw train (3,148); test = helen test + lfpw test + the ibug entries whose names start with
    "image" (689: the others have no image); val = `val_size` held out of train (HOLDOUT_SEED).
    Preprocessing (PROTOCOL.md): scale so the ground-truth box is 52 px wide, cut a 100x100 window
    centred on the box and shifted 2 px up, black outside the image, resize to 136, crop 20. Boxes
    and points are 1-based; the box width is MATLAB's xmax - xmin + 1. Deviation: the reference
    floors the scaled box centre to a whole pixel and puts it 1 px right/below of the true centre;
    we centre the window exactly (framing differs by about 1 px at most, image and labels alike).
    """

    name = "300w"
    landmark_names = W300_LANDMARKS
    eye_indices = (36, 45)
    metric = "iod"
    SUBSETS = {"train": (("afw", "afw"), ("helen_trainset", "helen/trainset"),
                         ("lfpw_trainset", "lfpw/trainset")),
               "test": (("helen_testset", "helen/testset"), ("lfpw_testset", "lfpw/testset"),
                        ("ibug", "ibug"))}

    def __init__(self, root, split="train", normalize=True, val_size=300):
        _check_split(split)
        root = _folder(root, "the 300W folder (with 'Bounding Boxes/', afw/, helen/, lfpw/, ibug/)")
        paths, boxes, keypoints = [], [], []
        for subset, folder in self.SUBSETS["test" if split == "test" else "train"]:
            for name, box in _read_300w_boxes(root / f"Bounding Boxes/bounding_boxes_{subset}.mat"):
                if subset == "ibug" and not name.startswith("image"):
                    continue  # listed in the .mat, but 300W ships no such image
                paths.append(root / folder / name)
                boxes.append(box)
                keypoints.append(_read_pts(paths[-1].with_suffix(".pts")))
        keep = _holdout(len(paths), split, val_size, f"the 300W {split} subsets in {root}")
        self.boxes = np.asarray(boxes, np.float64).reshape(-1, 4)[keep] - 1  # 1-based -> 0-based
        self._setup(split, normalize, [paths[i] for i in keep],
                    np.asarray(keypoints).reshape(-1, 68, 2)[keep] - 1, source=root)

    def _geometry(self, index, path, width, height):
        xmin, ymin, xmax, ymax = self.boxes[index]
        f = 52 / (xmax - xmin + 1)  # source -> "52 px box" scale
        cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
        # The 100 px window's pixel 0 sits 49.5 px left of / above its centre, which is the box
        # centre moved 2 px up (in the scaled image); in source pixels that is divided by f.
        return _crop_map(cx - 49.5 / f, cy - (49.5 + 2) / f, 100 / f, 100 / f)


def _read_300w_boxes(path):
    """[(image name, (xmin, ymin, xmax, ymax))] of a 300W 'Bounding Boxes' .mat file.

    The file holds `bounding_boxes`, a 1xN cell array of 1x1 structs (imgName, bb_detector,
    bb_ground_truth). loadmat wraps every level in arrays that squeeze_me=True would drop, so the
    fields are unwrapped rather than indexed, which reads both forms.
    """
    fmt = "'bounding_boxes', a cell array of structs with imgName and bb_ground_truth"

    def unwrap(value):  # peel 1x1 cells down to what they hold
        while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
            value = value.ravel()[0]
        return value

    entries = []
    for cell in np.ravel(_loadmat(path, fmt, ("bounding_boxes",))["bounding_boxes"]):
        try:
            struct = unwrap(cell)
            name = str(np.ravel(unwrap(struct["imgName"]))[0])
            box = np.asarray(unwrap(struct["bb_ground_truth"]), np.float64).ravel()
        except (ValueError, IndexError, KeyError, TypeError) as error:
            raise _bad(path, fmt, f"entry {len(entries) + 1} cannot be read ({error})") from None
        if box.size != 4:
            raise _bad(path, fmt, f"the box of {name} has {box.size} numbers instead of 4")
        entries.append((name, box))
    return entries


def _read_pts(path):
    """The 68 (x, y) points of a .pts file, as written (1-based)."""
    lines = [line for _, line in _lines(path, PTS_FORMAT)]
    if (len(lines) < 4 or not lines[0].startswith("version:") or lines[2] != "{" or lines[-1] != "}"
            or lines[1].split() != ["n_points:", "68"]):
        raise _bad(path, PTS_FORMAT, f"it starts {lines[:3]} and ends {lines[-1:]}")
    if len(lines) != 72:
        raise _bad(path, PTS_FORMAT, f"it has {len(lines) - 4} point lines")
    rows = _split(enumerate(lines[3:-1], 4), path, PTS_FORMAT, 2)
    return _numbers(rows, path, PTS_FORMAT, 0, 2)


# ---------------------------------------------------------------------------------------------
# Birds, cats, and bring-your-own data
# ---------------------------------------------------------------------------------------------
class CUB(_LandmarkDataset):
    """CUB-200-2011 (Wah et al. 2011), 15 parts with visibility, scored by PCK.

    root is the official release (`images.txt`, `parts/part_locs.txt`, `parts/parts.txt` for the
    part names if present, `images/`). The split is `split_file`, a text file of image paths
    relative to `images/` (e.g. ContrastLandmark's 1,241 / 382 / 383 Passeroidea lists; `split`
    then only names it), kept in its order; without it,
    the official `train_test_split.txt` (1 = train) with `val_size` images held out of train.
    The bounding boxes and classes are not needed. Preprocessing (PROTOCOL.md): the whole image
    resized to 96x96, aspect not kept, edge-aligned (out = (p + 0.5) * 96 / size - 0.5).
    Invisible parts keep visible=False (their stored x = y = 0 means nothing). ImageNet statistics.
    """

    name = "cub"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    landmark_names = CUB_PARTS
    metric = "pck"

    def __init__(self, root, split="train", normalize=True, split_file=None, val_size=500):
        _check_split(split)
        root = _folder(root, "the CUB_200_2011 folder (with images.txt, parts/ and images/)")
        images = _table(root / "images.txt", "rows '<image id> <path under images/>'", 2)
        ids = [fields[0] for _, fields in images]
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        if split_file is not None:
            wanted = [line for _, line in _lines(Path(split_file), "paths under images/")]
            by_path = {fields[1]: i for i, (_, fields) in enumerate(images)}
            absent = next((p for p in wanted if p not in by_path), None)
            if absent is not None:
                raise DatasetError(f"expected every row of {split_file} to be a path listed in "
                                   f"{root / 'images.txt'}, but {absent!r} is not")
            keep = np.array([by_path[p] for p in wanted], dtype=np.int64)
        else:
            fmt = "rows '<image id> 1|0' (1 = training image)"
            flags = dict(fields for _, fields in _table(root / "train_test_split.txt", fmt, 2))
            official = np.array([i for i, image_id in enumerate(ids)
                                 if flags.get(image_id) == ("0" if split == "test" else "1")],
                                dtype=np.int64)
            keep = official[_holdout(len(official), split, val_size, root / "train_test_split.txt")]
        parts_path = root / "parts/part_locs.txt"
        fmt = "rows '<image id> <part id 1-15> x y <visible 0|1>'"
        rows = _table(parts_path, fmt, 5)
        values = _numbers(rows, parts_path, fmt, 1, 5)  # (rows, 4): part id, x, y, visible
        image_rows = np.array([row_of.get(fields[0], -1) for _, fields in rows], dtype=np.int64)
        unknown = np.flatnonzero((image_rows < 0) | ~np.isin(values[:, 0], np.arange(1, 16)))
        if unknown.size:
            line = rows[unknown[0]][0]
            raise _bad(parts_path, fmt, f"line {line} names an unknown image or part")
        locations = np.full((len(ids), 15, 3), np.nan)  # (images, parts, (x, y, visible))
        locations[image_rows, values[:, 0].astype(np.int64) - 1] = values[:, 1:]
        incomplete = np.flatnonzero(np.isnan(locations).any(axis=(1, 2)))
        if incomplete.size:
            raise _bad(parts_path, fmt, f"image {ids[incomplete[0]]} lacks some of the 15 parts")
        names_path = root / "parts/parts.txt"
        if names_path.is_file():
            self.landmark_names = [" ".join(fields[1:]) for _, fields in _table(
                names_path, "rows '<part id> <part name>'")]
            if len(self.landmark_names) != 15:
                raise _bad(names_path, "15 rows '<part id> <part name>'",
                           f"it has {len(self.landmark_names)}")
        self._setup(split, normalize, [root / "images" / images[i][1][1] for i in keep],
                    locations[keep, :, :2], source=root, visible=locations[keep, :, 2] == 1)


class CatHeads(_LandmarkDataset):
    """Cat heads (Zhang et al. 2008): each `X.jpg` has `X.jpg.cat`, '9 x1 y1 ... x9 y9' (left eye,
    right eye, mouth, left ear 1-3, right ear 1-3; point 2 of each ear is its tip).

    root is searched recursively (CAT_00/ ... CAT_06/). As Rahaman et al., the two ear tips (indices
    4 and 7) are dropped: 7 landmarks. No official split; ours: a HOLDOUT_SEED shuffle gives
    `test_size` images to test, `val_size` to val, the rest to train. Preprocessing (our choice): a
    square of side 1.5 x the longer side of the box around all 9 points (tips included, so the ears
    fit), centred on that box, black outside the image, resized to 96x96. Face statistics.
    """

    name = "cat_heads"
    landmark_names = CAT_LANDMARKS

    def __init__(self, root, split="train", normalize=True, val_size=1000, test_size=1000):
        _check_split(split)
        root = _folder(root, "the cat heads folder (CAT_00/ ... with X.jpg and X.jpg.cat)")
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
        points = np.asarray(points).reshape(-1, 9, 2)[keep]
        self.frames = np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)  # (N, 4)
        self._setup(split, normalize, [annotations[i].with_suffix("") for i in keep],
                    points[:, CAT_KEEP], source=root)

    def _geometry(self, index, path, width, height):
        x0, y0, x1, y1 = self.frames[index]
        side = CAT_MARGIN * max(x1 - x0, y1 - y0)
        return _crop_map((x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side, side, resize=96, crop=0)


class CSVKeypoints(_LandmarkDataset):
    """Any images with points in a plain CSV (e.g. BBC Pose, or your own data).

    root is a folder with `train.csv`, `val.csv` and `test.csv`, or one `.csv` file used for every
    split. Each row: image path relative to the CSV's folder, then x, y (with `with_visible`:
    x, y, visible 0|1) per landmark, in source pixels, 0-based with pixel centres at integers
    (subtract 1 yourself from 1-based data). An optional header line (its second field is not a
    number) names the landmarks via its x columns, a trailing "_x" removed. The whole image is
    resized to `size` (int or (H, W)), aspect not kept, edge-aligned as CUB.
    """

    name = "csv"

    def __init__(self, root, split="train", normalize=True, size=96, with_visible=False,
                 landmark_names=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, eye_indices=None,
                 metric=None):
        _check_split(split)
        root = Path(root).expanduser()
        if root.suffix != ".csv":
            root = _folder(root, "a folder of split CSVs") / f"{split}.csv"
        path, per = root, (3 if with_visible else 2)
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
        self.landmark_names, self.size = landmark_names, _size_pair(size)
        self.mean, self.std, self.eye_indices, self.metric = mean, std, eye_indices, metric
        visible = values[..., 2] == 1 if with_visible else None
        self._setup(split, normalize, [path.parent / fields[0] for _, fields in rows],
                    values[..., :2], source=path, visible=visible)


class ImageFolderUnlabelled(_LandmarkDataset):
    """Unlabelled images (K = 0) for pretraining, e.g. iNaturalist Aves.

    root is a folder (searched recursively for image files) or a text file with one path per row
    (relative to the text file's folder, or absolute). There is no test split; val = `val_size`
    images held out with HOLDOUT_SEED (0 by default: everything is train). Each image is resized so
    its shorter side fits `size` (int or (H, W)) and centre-cropped, keeping the aspect ratio.
    """

    name = "image_folder"

    def __init__(self, root, split="train", normalize=True, size=96, val_size=0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        _check_split(split)
        if split == "test":
            raise ValueError("an unlabelled image folder has no test split; use 'train' or 'val'")
        root = Path(root).expanduser()
        if root.is_file():
            paths = [root.parent / line for _, line in _lines(root, "one image path per row")]
        else:
            paths = sorted(p for p in _folder(root, "a folder of images").rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise DatasetError(f"expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}, "
                               f"but found none")
        if split == "val" and not val_size:
            raise ValueError("the val split of an image folder needs val_size > 0")
        paths = [paths[i] for i in _holdout(len(paths), split, val_size, root)]
        self.size, self.mean, self.std = _size_pair(size), mean, std
        self._setup(split, normalize, paths, np.zeros((len(paths), 0, 2)), source=root)

    def _geometry(self, index, path, width, height):
        out_h, out_w = self.size
        crop_w, crop_h = np.array([out_w, out_h]) / max(out_w / width, out_h / height)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return _box_map(left, top, left + crop_w, top + crop_h, out_w, out_h)


# =========================================================================================================
# 4. Warps that move images and points together
#
# Thin-plate spline (TPS), affine and elastic warps and their compositions, one warp per sample of a batch.
# Coordinates are normalised (x, y) in [-1, 1], as grid_sample(align_corners=True) reads them: -1 and +1 are the
# centres of the first and last pixel, so normalised = 2 px / (size - 1) - 1 (`to_normalised`, `to_pixels`).
# A warp turns an input image into an output image:
#   backward(u)  output -> input, the sampling map: output pixel u shows the input at backward(u);
#   grid(H, W)   backward at every output pixel (N, H, W, 2): what grid_sample needs, and the dense
#                correspondence "output pixel -> input location";
#   forward(x)   input -> output, where an input landmark lands: in closed form for the affine warp, else by
#                Newton's method on backward, to a residual of 1e-6 normalised (~5e-5 px at 96 px).
# `a.then(b)` is "first a, then b". Points that leave the frame are never clamped: `in_frame` says which are on
# the image. Random parameters are drawn in float32 on the generator's device (the CPU by default) and then
# moved, so a seed gives the same warps on every device and in every dtype. No function here reads a tensor's
# value on the host, so a GPU never waits for one (tests/test_warps.py counts the calls that would).
# docs/protocol.md describes DVE's TPS (its presets, where strong draws fold) and why points are moved exactly.
# =========================================================================================================
def _hw(size):
    """(H, W) from an int or a pair; at least 2 pixels per side (normalising divides by W - 1)."""
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if H < 2 or W < 2:
        raise ValueError(f"Image size must be at least 2x2 pixels, got {H}x{W}.")
    return H, W


def to_normalised(points_px, size):
    """Pixel (x, y), centres at integers -> [-1, 1] grid_sample(align_corners=True) coordinates."""
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
    lo = margin - 0.5
    return (x >= lo) & (y >= lo) & (x <= W - 0.5 - margin) & (y <= H - 0.5 - margin)


def identity_grid(H, W, device="cpu", dtype=torch.float32):
    """(H, W, 2) normalised (x, y) of every pixel centre: the sampling grid of the identity warp."""
    ys = torch.linspace(-1.0, 1.0, H, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, W, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)


def _draw(sampler, generator, *shape):
    """torch.randn or torch.rand numbers in float32 on the generator's device (the CPU when None)."""
    return sampler(*shape, generator=generator, device=generator.device if generator is not None else "cpu")


def _on(tensor, device, dtype):
    """Move drawn parameters to `device`; to a GPU from pinned memory without blocking, so the host goes on."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)


class Warp:
    """A batch of ``n`` warps with parameters on ``device`` in ``dtype``. Subclasses define ``backward`` and
    usually an analytic ``jacobian``; ``forward`` inverts ``backward`` with Newton's method."""

    newton_steps = 20  # enough for a double root at the edge of a fold, where each step only halves the error

    def __init__(self, n, device, dtype):
        self.n, self.device, self.dtype = int(n), torch.device(device), dtype

    def backward(self, uv):
        """(N, P, 2) output coordinates -> (N, P, 2) input coordinates."""
        raise NotImplementedError

    def jacobian(self, uv):
        """(N, P, 2, 2) Jacobian of ``backward``, J[..., i, j] = d backward_i / d u_j, by autograd (subclasses
        use the formula). Each output depends on its own point only, so two gradients give every row."""
        with torch.enable_grad():
            u = uv.detach().requires_grad_(True)
            b = self.backward(u)
            rows = [torch.autograd.grad(b[..., i].sum(), u, retain_graph=i == 0)[0] for i in range(2)]
        return torch.stack(rows, dim=-2)

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
        1, 1/2, 1/4, 1/8 that lowers the residual (the four are tried at once). A point stops at a residual of
        1e-6 (float32) or 1e-12 (float64), typically after 2-4 steps; all ``newton_steps`` run anyway, as masked
        updates, so that nothing is read on the host. Near a root every step at least halves the residual (even
        at a double root, on a fold's edge); a point that gains less than 25% three times while far from any
        root circles a fold with no solution and stops. Residuals left above 1e-4 come back as NaN."""
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


# ---------------------------------------------------------------------------------------------------------
# Thin-plate spline (DVE's parameterisation)
# ---------------------------------------------------------------------------------------------------------
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
    """backward(u) = [U(|u - c_1|^2) ... U(|u - c_100|^2) | 1 | x | y] @ weights, U(D) = D log(D + 1e-5), c_k
    the 10x10 control grid. ``weights`` (N, 103, 2): rows 0-99 non-rigid, row 100 the shift (tx, ty), rows
    101-102 the linear part (zeros, then rows (1, 0) and (0, 1) give the identity)."""

    def __init__(self, weights):
        if weights.dim() != 3 or weights.shape[1:] != (103, 2):
            raise ValueError(f"TPS weights must have shape (N, 103, 2), got {tuple(weights.shape)}.")
        super().__init__(weights.shape[0], weights.device, weights.dtype)
        self.weights = weights
        self.controls = _tps_controls(self.device, self.dtype)
        # For the Jacobian: (N, 100, 6) = [W_ki for i | W_ki c_kj for (i, j)].
        V = (weights[:, :100].unsqueeze(-1) * self.controls.unsqueeze(1)).reshape(self.n, 100, 4)
        self._jacobian_weights = torch.cat((weights[:, :100], V), dim=2)

    def backward(self, uv):
        D = _tps_sq_dist(uv, self.controls)  # (N, P, 100)
        W = self.weights
        return (D * torch.log(D + _TPS_EPS)) @ W[:, :100] + W[:, 100:101] + uv @ W[:, 101:]

    def jacobian(self, uv):
        # d U(D_k) / d u_j = U'(D_k) 2 (u_j - c_kj), U'(D) = log(D + eps) + D / (D + eps), so
        # J_ij = 2 (u_j s_i - M_ij) + W[101 + j, i], s_i = sum_k U'_k W_ki, M_ij = sum_k U'_k W_ki c_kj.
        D = _tps_sq_dist(uv, self.controls)
        dU = torch.log(D + _TPS_EPS) + D / (D + _TPS_EPS)  # (N, P, 100)
        sM = dU @ self._jacobian_weights  # (N, P, 6): s_i, then M_ij in (i, j) order
        J = 2.0 * (sM[..., :2, None] * uv.unsqueeze(-2) - sM[..., 2:].reshape(*uv.shape[:2], 2, 2))
        return J + self.weights[:, 101:].transpose(1, 2).unsqueeze(1)

    def _lattice(self, H, W, extent):
        # One (H*W, 103) x (103, N*2) product for the whole batch instead of N small ones.
        feats = _tps_lattice_features(H, W, extent, self.device, self.dtype)
        g = feats @ self.weights.permute(1, 0, 2).reshape(103, self.n * 2)  # (H*W, N*2)
        return g.reshape(H, W, self.n, 2).permute(2, 0, 1, 3)


def random_tps(n, preset="pair", generator=None, device="cpu", dtype=torch.float32, nonrigid_scale=1.0,
               affine_scale=1.0):
    """N random TPS warps (DVE's): non-rigid weights ~ N(0, sd_all), each replaced with probability 1/2 by a
    draw from N(0, sd_subset); rotation r ~ N(0, rot_sd) degrees, scale s = 1 + N(0, scale_sd), shift
    ~ N(0, trans_sd); affine rows (tx, ty), (s cos r, -s sin r), (s sin r, s cos r). The sds of
    ``TPS_PRESETS[preset]``, the non-rigid ones times ``nonrigid_scale`` and the affine ones times
    ``affine_scale`` (DVE's im1_multiplier and im1_multiplier_aff). Returns a ``TPSWarp``."""
    if preset not in TPS_PRESETS:
        raise ValueError(f"TPS preset must be one of {sorted(TPS_PRESETS)}, got {preset!r}.")
    p = TPS_PRESETS[preset]
    nonrigid = _draw(torch.randn, generator, n, 100, 2) * (nonrigid_scale * p["sd_all"])
    redrawn = _draw(torch.randn, generator, n, 100, 2) * (nonrigid_scale * p["sd_subset"])
    nonrigid = torch.where(_draw(torch.rand, generator, n, 100, 2) < 0.5, redrawn, nonrigid)
    rot = _draw(torch.randn, generator, n) * (affine_scale * p["rot_sd"] * math.pi / 180.0)
    scale = 1.0 + _draw(torch.randn, generator, n) * (affine_scale * p["scale_sd"])
    trans = _draw(torch.randn, generator, n, 2) * (affine_scale * p["trans_sd"])
    cos, sin = scale * torch.cos(rot), scale * torch.sin(rot)
    affine = torch.stack((trans, torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), dim=1)  # (n, 3, 2)
    return TPSWarp(_on(torch.cat((nonrigid, affine), dim=1), device, dtype))


class TPSPair(NamedTuple):
    """``tps_training_pair``'s result: image1 = input warped by ``warp1``; image2 = image1 warped by ``warp12``.
    ``warp12.grid(H, W)`` gives every pixel of image 2 its location in image 1 (DVE's ``grid``)."""
    image1: torch.Tensor  # (N, C, H, W)
    image2: torch.Tensor  # (N, C, H, W)
    points1: Optional[torch.Tensor]  # (N, K, 2) pixels in image 1, or None
    points2: Optional[torch.Tensor]  # (N, K, 2) pixels in image 2, or None
    warp1: TPSWarp  # input -> image 1
    warp12: TPSWarp  # image 1 -> image 2


def tps_training_pair(images, points=None, generator=None, preset="pair"):
    """Two TPS views of each image, as DVE makes them. "pair": image 1 from a draw with the non-rigid sds
    halved, image 2 = image 1 warped again by a full draw; "match" (the matching benchmark): both draws from the
    "match" sds. Image 2 is resampled from image 1, so what left image 1 stays empty in image 2. ``points``:
    optional (N, K, 2) pixel points of ``images``. Returns a ``TPSPair``."""
    if preset not in ("pair", "match"):
        raise ValueError(f"tps_training_pair preset must be 'pair' or 'match', got {preset!r}.")
    n, _, H, W = images.shape
    kw = dict(generator=generator, device=images.device,
              dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)
    warp1 = random_tps(n, preset, nonrigid_scale=0.5 if preset == "pair" else 1.0, **kw)
    warp12 = random_tps(n, preset, **kw)
    image1 = warp_images(images, warp1)
    image2 = warp_images(image1, warp12)
    points1 = points2 = None
    if points is not None:
        points1 = warp_points(points, warp1, (H, W))
        points2 = warp_points(points1, warp12, (H, W))
    return TPSPair(image1, image2, points1, points2, warp1, warp12)


# ---------------------------------------------------------------------------------------------------------
# Affine and elastic warps
# ---------------------------------------------------------------------------------------------------------
def _invert_affine(theta):
    """(N, 2, 3) [A | t] of x -> A x + t  ->  [A^-1 | -A^-1 t], in closed form."""
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    inv = torch.stack((torch.stack((d, -b), -1), torch.stack((-c, a), -1)), dim=1) / (a * d - b * c)[:, None, None]
    return torch.cat((inv, -inv @ theta[:, :, 2:]), dim=2)


class AffineWarp(Warp):
    """backward(u) = A u + t, ``theta`` = [A | t] (N, 2, 3), the matrix ``F.affine_grid`` takes (output ->
    input). ``AffineWarp.from_forward(m)`` builds it from the input -> output matrix."""

    def __init__(self, theta):
        if theta.dim() != 3 or theta.shape[1:] != (2, 3):
            raise ValueError(f"Affine theta must have shape (N, 2, 3), got {tuple(theta.shape)}.")
        super().__init__(theta.shape[0], theta.device, theta.dtype)
        self.theta = theta

    @classmethod
    def from_forward(cls, matrix):
        return cls(_invert_affine(matrix))

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
    return AffineWarp.from_forward(_on(matrix, device, dtype))


def zoom_out(n, factor, device="cpu", dtype=torch.float32):
    """Affine warps that shrink the content about the image centre by ``factor`` (a number or an (n,) CPU
    tensor): 2 makes the object half as large (the border fills with zeros), 1 is the identity, 0.5 zooms in."""
    theta = torch.zeros(n, 2, 3, dtype=dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.as_tensor(factor, dtype=theta.dtype)  # backward: u -> factor u
    return AffineWarp(_on(theta, device, dtype))


def identity_warp(n, device="cpu", dtype=torch.float32):
    """N identity warps (an ``AffineWarp``)."""
    return zoom_out(n, 1.0, device, dtype)


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
        N, _, ny, nx = self.weights.shape
        rows = gy @ self.weights.transpose(1, 2).reshape(N, ny, 2 * nx)  # (N, P, 2 * nx): one bmm for both c
        return (rows.reshape(N, -1, 2, nx) * gx.unsqueeze(2)).sum(-1)

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
        ny, nx = self.weights.shape[2:]
        # gy @ weights @ gx.T as two plain 2-D products (several times faster than broadcast matmuls).
        rows = (self.weights.reshape(-1, nx) @ gx.T).reshape(self.n * 2, ny, -1)  # (N*2, ny, W)
        field = gy @ rows.transpose(0, 1).reshape(ny, -1)  # (H, N*2*W)
        return field.reshape(len(ys), self.n, 2, len(xs)).permute(1, 2, 0, 3)

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


# ---------------------------------------------------------------------------------------------------------
# Composition, and applying warps to images and points
# ---------------------------------------------------------------------------------------------------------
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


def warp_images(images, warp, padding_mode="zeros"):
    """(N, C, H, W) -> (N, C, H, W): bilinear ``grid_sample`` of ``warp.grid(H, W)``, align_corners=True. Pixels
    whose source lies outside the input get ``padding_mode`` (zeros by default)."""
    if images.dim() != 4 or images.shape[0] != warp.n:
        raise ValueError(f"Expected images (N={warp.n}, C, H, W) matching the warp batch, got {tuple(images.shape)}.")
    grid = warp.grid(images.shape[2], images.shape[3]).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


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
DATASETS = {
    "synth-faces": "built-in aligned faces, 5 MAFL-style landmarks (default; needs no files)",
    "synth-faces-dense": "built-in aligned faces, dense annotation (brows, eye corners, nose, mouth, jaw)",
    "synth-faces-wild": "built-in faces in the wild: scale, rotation, clutter, occluders, 5 landmarks",
    "synth-faces-wild-dense": "built-in faces in the wild, dense annotation",
    "synth-faces-clutter": "built-in aligned faces (the same as synth-faces) in the wild variant's cluttered scenes",
    "synth-birds": "built-in birds, the 15 CUB parts with visibility",
    "celeba": "CelebA aligned, self-supervised split (partition 0 minus MAFL), --data-root = CelebA folder",
    "celeba-wild": "CelebA in the wild (Img/img_celeba + bounding boxes)",
    "mafl": "MAFL (CelebA subset with 5 landmarks), --data-root = CelebA folder holding MAFL/",
    "aflw-m": "AFLW as re-cropped by MTFL (AFLW_M), --data-root holding MTFL/ and aflw_cropped/",
    "aflw-r": "AFLW_R (Thewlis et al. crops), --data-root holding output/ and the .mat files",
    "300w": "300-W, 68 landmarks, --data-root holding 'Bounding Boxes/', afw/, helen/, lfpw/, ibug/",
    "cub": "CUB-200-2011 with split lists, --data-root = CUB_200_2011 folder",
    "folder": "any folder of images (or a text list of paths), unlabelled, e.g. iNaturalist Aves",
    "cats": "Cat heads (Zhang et al. 2008), X.jpg + X.jpg.cat, 7 landmarks",
    "csv": "a CSV of 'image, x1, y1, x2, y2, ...' rows (with_visible: x, y, v), --data-root = file or folder",
}


def make_dataset(name, split="train", root=None, size=96, normalize=True, **kwargs):
    """Build the dataset called `name` (one of DATASETS) for `split` ("train", "val" or "test").

    `root` is the dataset's folder on disk (ignored by the built-in synthetic data); extra keyword arguments
    go to the dataset's constructor (e.g. ``length`` for synthetic data, ``split_file`` for CUB).
    """
    if name.startswith("synth-"):
        if name == "synth-birds":
            return SyntheticBirds(split=split, size=size, normalize=normalize, **kwargs)
        variant = "wild" if "-wild" in name else "clutter" if "-clutter" in name else "aligned"
        annotation = "dense" if name.endswith("-dense") else "mafl"
        if name not in DATASETS:
            raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
        return SyntheticFaces(split=split, variant=variant, annotation=annotation, size=size,
                              normalize=normalize, **kwargs)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if root is None:
        raise DatasetError(f"dataset {name!r} is read from disk: pass its folder with --data-root")
    if size != 96:
        raise DatasetError(f"dataset {name!r} follows the reference preprocessing to 96x96 images; "
                           f"got --image-size {size}")
    kwargs["normalize"] = normalize
    if name in ("celeba", "celeba-wild"):
        return CelebA(root, split=split, wild=(name == "celeba-wild"), **kwargs)
    if name == "mafl":
        return MAFL(root, split=split, **kwargs)
    if name == "aflw-m":
        return AFLW_M(root, split=split, **kwargs)
    if name == "aflw-r":
        return AFLW_R(root, split=split, **kwargs)
    if name == "300w":
        return W300(root, split=split, **kwargs)
    if name == "cub":
        return CUB(root, split=split, **kwargs)
    if name == "folder":
        return ImageFolderUnlabelled(root, split=split, **kwargs)
    if name == "cats":
        return CatHeads(root, split=split, **kwargs)
    return CSVKeypoints(root, split=split, **kwargs)


# =========================================================================================================
# 6. The exported feature-extractor contract
#
# A method hands its frozen dense features to regress.py / match.py as ONE file made with torch.export
# (no pickled Python classes, so the evaluation never imports a method file). The extractor takes RGB
# images in [0, 1], (B, 3, H, W) at meta["input_size"], normalises them itself and returns (B, C, h, w).
# The batch dimension is dynamic. meta (stored beside the graph as meta.json) says what the output is:
#   input_size      [H, W]
#   kind            "features" (dense descriptors) or "heatmaps" (each channel a spatial probability map
#                   summing to 1, e.g. discovered landmarks, evaluated by `regress.py --head ridge`)
#   channels        C
#   channel_groups  [[name, start, stop], ...]: e.g. the hypercolumn's layers; one group when unstructured
#   mean, std       the normalisation baked inside (for information)
#   method, variant free text naming what produced it (e.g. "moco_hypercol", "hypercol")
# Geometry of the output map: the evaluation places cell (0, 0) on the centre of pixel (0, 0) and cell
# (h-1, w-1) on the centre of pixel (H-1, W-1) (the align_corners=True convention of every grid here), as a
# map resized with F.interpolate(..., align_corners=True) is; a plain strided CNN map is off by up to half a
# stride from this, which the evaluation's linear heads absorb but matching does not.
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


def save_extractor(module, path, meta, mean, std, example_input=None):
    """Export `module` (normalised images -> (B, C, h, w)) as a frozen extractor of [0, 1] images.

    The module is wrapped with `Normalize(mean, std)`, put in eval mode and exported with a dynamic batch
    dimension. `meta` needs the keys listed above except channels, mean and std, which are filled in from
    a forward pass. Returns the completed meta dict.
    """
    meta = dict(meta)
    missing = [k for k in ("input_size", "kind", "method", "variant") if k not in meta]
    if missing:
        raise ValueError(f"extractor meta lacks {missing}")
    if meta["kind"] not in ("features", "heatmaps"):
        raise ValueError(f"meta['kind'] must be 'features' or 'heatmaps', not {meta['kind']!r}")
    height, width = meta["input_size"]
    model = nn.Sequential(Normalize(mean, std), module).eval()
    device = next(model.parameters(), model[0].mean).device
    if example_input is None:
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
        return self.module(images.to(self.device))

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
# NMF is the unsupervised baseline of two papers (Cheng et al. Tab. 4, LEAD Tab. 1), so it lives here once.
# The run helpers are the generic part of every script (device, precision, seeding, run directory, log,
# atomic checkpoints, the input pipeline); each method file keeps its own training loop in plain sight.
# Exact resume without random states: every random draw after initialisation is a function of
# (seed, epoch, step or sample index) (`generator`), so a checkpoint holds models, optimisers and the step.
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
    """Data-loader processes: the machine's cores on a GPU (the device waits for nothing else), 1 on a CPU
    (where every extra process competes with the training step for the same cores)."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) \
        if device.type == "cuda" else 1


def to_device(batch, device):
    """Copy a dict of (pinned) tensors to `device` without waiting for the copy (non_blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# =========================================================================================================
# 8. Command line: previews of the datasets
# =========================================================================================================
def main(argv=None):
    parser = argparse.ArgumentParser(description="Look at a dataset: draws a contact sheet of samples with "
                                     "their landmarks.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    preview = sub.add_parser("preview", help="save a PNG grid of samples with landmarks",
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
