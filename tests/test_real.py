"""Real dataset loaders against fixture files written in the exact on-disk formats.

Every fixture is tiny and written into pytest's tmp_path. Images are black with 3x3 white marks and
saved as PNG bytes even behind a .jpg name (lossless, and PIL recognises the format from the
content), so a mark can be found again in the 96x96 output. Expected keypoints are written out from
the preprocessing formulas of docs/protocol.md (or the loader's documented choice), not computed by the
loaders' code.
"""
import functools
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from data import (AFLW_M, AFLW_R, CUB, MAFL, W300, CatHeads, CelebA, CSVKeypoints, DatasetError,
                  ImageFolderUnlabelled, make_dataset)

FACE_MEAN = (0.5084, 0.4224, 0.3769)
FACE_STD = (0.2599, 0.2371, 0.2323)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def save_image(path, width, height, marks=(), background=0):
    """A (height, width) image with a 3x3 white square centred on each integer pixel (x, y)."""
    pixels = np.full((height, width, 3), background, np.uint8)
    for x, y in marks:
        pixels[y - 1:y + 2, x - 1:x + 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def mark_centre(image):
    """Brightness-weighted centroid (x, y) of an unnormalised (3, H, W) image with one mark."""
    weight = image.mean(0).double()
    ys, xs = torch.meshgrid(torch.arange(weight.shape[0]), torch.arange(weight.shape[1]),
                            indexing="ij")
    return torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def check_sample(dataset, index=0, num_landmarks=None):
    """The sample format and attributes of data.py's module docstring; returns the sample."""
    sample = dataset[index]
    k = dataset.num_landmarks if num_landmarks is None else num_landmarks
    assert dataset.num_landmarks == k == len(dataset.landmark_names)
    assert sample["image"].shape == (3, *dataset.size) and sample["image"].dtype == torch.float32
    assert sample["keypoints"].shape == (k, 2) and sample["keypoints"].dtype == torch.float32
    assert sample["visible"].shape == (k,) and sample["visible"].dtype == torch.bool
    assert isinstance(sample["identity"], int) and sample["index"] == index
    assert isinstance(dataset.name, str) and len(dataset.mean) == len(dataset.std) == 3
    assert dataset.has_mask is False and dataset.poses_per_identity == 1
    return sample


def assert_mark_at_keypoint(dataset, index, landmark, tolerance=0.1):
    """The source mark drawn on `landmark` lands on its predicted output location."""
    sample = dataset[index]
    assert torch.allclose(mark_centre(sample["image"]), sample["keypoints"][landmark].double(),
                          atol=tolerance)


# ---------------------------------------------------------------------------------------------
# CelebA and MAFL
# ---------------------------------------------------------------------------------------------
NAMES = [f"{i:06d}.jpg" for i in range(1, 14)]
PARTITION = [0] * 8 + [1, 1] + [2] * 3  # images 1-8 train, 9-10 val, 11-13 test
MAFL_TRAIN = ["000002.jpg", "000003.jpg", "000005.jpg", "000006.jpg", "000009.jpg", "000011.jpg"]
MAFL_TEST = ["000004.jpg", "000012.jpg"]
HEADER = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y " \
         "rightmouth_x rightmouth_y"


def aligned_landmarks(i):
    """Landmarks of image i (1-based) in the aligned list: left eye (60 + i, 100 + i)."""
    return [60 + i, 100 + i, 106, 113, 77, 142, 73, 152, 108, 154]


def make_celeba(root, wild=False):
    rows = "".join(f"{name} " + "  ".join(map(str, aligned_landmarks(i + 1))) + "\n"
                   for i, name in enumerate(NAMES))  # CelebA pads the columns with spaces
    write(root / "Anno/list_landmarks_align_celeba.txt", f"{len(NAMES)}\n{HEADER}\n{rows}")
    write(root / "Eval/list_eval_partition.txt",
          "".join(f"{name} {part}\n" for name, part in zip(NAMES, PARTITION)))
    write(root / "MAFL/training.txt", "\n".join(MAFL_TRAIN) + "\n")
    write(root / "MAFL/testing.txt", "\n".join(MAFL_TEST) + "\n")
    write(root / "Anno/identity_CelebA.txt",
          "".join(f"{name} {100 + i + 1}\n" for i, name in enumerate(NAMES)))
    for i, name in enumerate(NAMES):
        left_eye = aligned_landmarks(i + 1)[:2]
        save_image(root / "Img/img_align_celeba" / name, 178, 218, [left_eye])
    if wild:  # every image: 400x500, face box x 95, y 71, w 226, h 313 (CelebA's 000001.jpg)
        write(root / "Anno/list_bbox_celeba.txt", f"{len(NAMES)}\nimage_id x_1 y_1 width height\n"
              + "".join(f"{n}    95  71 226 313\n" for n in NAMES))
        write(root / "Anno/list_landmarks_celeba.txt", f"{len(NAMES)}\n{HEADER}\n"
              + "".join(f"{n} 165 184 244 176 196 249 194 271 266 260\n" for n in NAMES))
        for name in NAMES:
            save_image(root / "Img/img_celeba" / name, 400, 500, [(165, 184)])
    return root


def test_celeba_splits_exclude_every_mafl_image(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    expected = {"train": ["000001.jpg", "000007.jpg", "000008.jpg"], "val": ["000010.jpg"],
                "test": ["000013.jpg"]}
    for split, names in expected.items():
        dataset = CelebA(root, split)
        assert [Path(p).name for p in dataset.paths] == names
        assert not set(names) & set(MAFL_TRAIN + MAFL_TEST)
    dataset = CelebA(root, "train", normalize=False)
    assert (dataset.name, dataset.eye_indices, dataset.metric) == ("celeba", (0, 1), "iod")
    assert (dataset.mean, dataset.std) == (FACE_MEAN, FACE_STD)
    sample = check_sample(dataset, 0, num_landmarks=5)
    assert sample["identity"] == 101 and sample["visible"].all()


def test_celeba_aligned_keypoints_and_image(tmp_path):
    dataset = CelebA(make_celeba(tmp_path / "celeba"), "train", normalize=False)
    # 000001.jpg: left eye (61, 101), right eye (106, 113); y - 30, times 136/178, minus 20
    expected = [[61 * 136 / 178 - 20, (101 - 30) * 136 / 178 - 20],
                [106 * 136 / 178 - 20, (113 - 30) * 136 / 178 - 20]]
    assert torch.allclose(dataset[0]["keypoints"][:2], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(dataset, 0, landmark=0)


def test_celeba_accepts_the_hq_folder(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    (root / "Img/img_align_celeba").rename(root / "Img/img_align_celeba_hq")
    assert Path(CelebA(root, "train").paths[0]).parent.name == "img_align_celeba_hq"


def test_celeba_in_the_wild(tmp_path):
    root = make_celeba(tmp_path / "celeba", wild=True)
    dataset = CelebA(root, "train", normalize=False, wild=True)
    assert dataset.name == "celeba_wild"
    # our crop: square of side 1.25 * max(226, 313) centred on the box, -> 136, crop 20
    side = 1.25 * 313
    left, top = 95 + 226 / 2 - side / 2, 71 + 313 / 2 - side / 2
    expected = [(165 - left) * 136 / side - 20, (184 - top) * 136 / side - 20]
    assert torch.allclose(dataset[0]["keypoints"][0], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(dataset, 0, landmark=0)


def test_mafl_splits_and_keypoints(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    train, val = MAFL(root, "train", val_size=2), MAFL(root, "val", val_size=2)
    test = MAFL(root, "test", normalize=False)
    assert (len(train), len(val), len(test)) == (4, 2, 2)
    train_names, val_names = [Path(p).name for p in train.paths], [Path(p).name for p in val.paths]
    assert not set(train_names) & set(val_names)
    assert sorted(train_names + val_names) == sorted(MAFL_TRAIN)
    assert train_names == [n for n in MAFL_TRAIN if n in train_names]  # file order kept
    assert [Path(p).name for p in MAFL(root, "val", val_size=2).paths] == val_names  # deterministic
    assert [Path(p).name for p in test.paths] == MAFL_TEST
    sample = check_sample(test, 0, num_landmarks=5)  # 000004.jpg: left eye (64, 104)
    expected = [64 * 136 / 178 - 20, (104 - 30) * 136 / 178 - 20]
    assert torch.allclose(sample["keypoints"][0], torch.tensor(expected), atol=1e-4)
    assert sample["identity"] == 104
    assert test.name == "mafl" and test.eye_indices == (0, 1) and test.metric == "iod"
    assert_mark_at_keypoint(test, 1, landmark=0)


def test_normalize_uses_the_face_statistics(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    raw, normalised = MAFL(root, "test", normalize=False)[0], MAFL(root, "test")[0]
    mean, std = torch.tensor(FACE_MEAN).view(3, 1, 1), torch.tensor(FACE_STD).view(3, 1, 1)
    assert torch.allclose(normalised["image"] * std + mean, raw["image"], atol=1e-5)
    assert raw["image"].min() >= 0 and raw["image"].max() <= 1


def test_samples_batch_with_the_default_collate(tmp_path):
    loader = torch.utils.data.DataLoader(MAFL(make_celeba(tmp_path / "c"), "test"), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 96, 96) and batch["keypoints"].shape == (2, 5, 2)


def test_celeba_and_mafl_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        CelebA(tmp_path / "nowhere")
    root = make_celeba(tmp_path / "celeba")
    with pytest.raises(DatasetError, match="too few to hold out val_size=6"):
        MAFL(root, "train", val_size=6)
    landmarks = root / "Anno/list_landmarks_align_celeba.txt"
    good = landmarks.read_text()
    landmarks.write_text(good.replace("13\n", "14\n", 1))  # count line disagrees with the rows
    with pytest.raises(DatasetError, match="first line announces 14 rows and it has 13"):
        CelebA(root)
    landmarks.write_text(good.replace(HEADER + "\n", ""))  # header line missing
    with pytest.raises(DatasetError, match="announces 13 rows and it has 12"):
        CelebA(root)
    landmarks.write_text(good.replace("  154\n", "\n", 1))  # a row lacking a column
    with pytest.raises(DatasetError, match="line 3 has 10 columns"):
        MAFL(root, "test")
    landmarks.write_text(good.replace("  154\n", "  x54\n", 1))
    with pytest.raises(DatasetError, match="line 3 has a non-number"):
        MAFL(root, "test")
    landmarks.write_text(good.replace("000004.jpg", "000099.jpg"))
    with pytest.raises(DatasetError, match="000004.jpg has none"):
        MAFL(root, "test")
    landmarks.write_text(good)
    (root / "Anno/identity_CelebA.txt").write_text("000001.jpg 7\n")
    with pytest.raises(DatasetError, match="identity_CelebA.txt to have a row .* 000007.jpg"):
        CelebA(root)
    (root / "Anno/identity_CelebA.txt").unlink()  # optional file: identity then unknown
    assert CelebA(root)[0]["identity"] == -1
    (root / "Eval/list_eval_partition.txt").write_text("000001.jpg 3\n")
    with pytest.raises(DatasetError, match="line 1 has partition '3'"):
        CelebA(root)
    (root / "MAFL/testing.txt").unlink()
    with pytest.raises(DatasetError, match=r"one CelebA image name per row .* at .*MAFL/testing"):
        CelebA(root)


def test_image_errors_name_the_file(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    dataset = MAFL(root, "test")
    (root / "Img/img_align_celeba/000004.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="readable image at .*000004.jpg"):
        dataset[0]
    (root / "Img/img_align_celeba/000004.jpg").unlink()
    with pytest.raises(DatasetError, match="readable image at .*000004.jpg"):
        dataset[0]
    save_image(root / "Img/img_align_celeba/000012.jpg", 100, 100)
    with pytest.raises(DatasetError, match=r"000012.jpg to be a 178x218 image .* it is 100x100"):
        dataset[1]


# ---------------------------------------------------------------------------------------------
# AFLW, MTFL version
# ---------------------------------------------------------------------------------------------
def aflw_points(i):
    """1-based points of crop i: left eye (40 + i, 50 + 2 * i), then fixed ones."""
    return [(40 + i, 50 + 2 * i), (100, 52), (75, 80), (55, 110), (95, 108)]


def make_aflw_m(root, index_column=True):
    # Thewlis et al.'s CSV; the reference reads the points at columns 4-13, so the real file
    # most likely starts with an unnamed pandas index column.
    names = ["image_file", "set", "crop_file"] + [f"{a}{k}" for k in range(1, 6) for a in "xy"]
    lines = [",".join([""] * index_column + names)]
    for i in range(7):
        points = ",".join(f"{x},{y}" for x, y in aflw_points(i))
        row_set = 2 if i == 3 else 1  # row 3 belongs to another set and is not used
        fields = [str(i)] * index_column + [f"image{i}.jpg", str(row_set), f"{i}_crop.jpg"]
        lines.append(",".join(fields) + "," + points)
        save_image(root / "aflw_cropped/cropped" / f"{i}_crop.jpg", 150, 150,
                   [(x - 1, y - 1) for x, y in aflw_points(i)[:1]])
    write(root / "aflw_cropped/facedata_cropped.csv", "\n".join(lines) + "\n")
    # MTFL: a leading space, x1..x5 then y1..y5, 1-based, 4 attribute columns (or none)
    write(root / "MTFL/testing.txt",
          " AFLW/2780-image11569.jpg 50 100 75 60 90 60 62 85 105 104 1 2 2 3\n"
          " AFLW\\10-image2.jpg 41 101 76 61 91 61 63 86 106 105\n")
    save_image(root / "MTFL/AFLW/2780-image11569.jpg", 150, 150, [(49, 59)])
    save_image(root / "MTFL/AFLW/10-image2.jpg", 150, 150, [(40, 60)])
    return root


@pytest.mark.parametrize("index_column", [True, False])
def test_aflw_m_train_from_the_csv(tmp_path, index_column):
    root = make_aflw_m(tmp_path / "aflw", index_column)
    train = AFLW_M(root, "train", normalize=False, val_size=2)
    val = AFLW_M(root, "val", val_size=2)
    used = sorted(Path(p).name for p in train.paths + val.paths)
    assert (len(train), len(val)) == (4, 2) and "3_crop.jpg" not in used  # set 2 row skipped
    i = int(Path(train.paths[0]).name[0])
    x, y = aflw_points(i)[0]  # 1-based: subtract 1, times 136/150, crop 20
    sample = check_sample(train, 0, num_landmarks=5)
    expected = [(x - 1) * 136 / 150 - 20, (y - 1) * 136 / 150 - 20]
    assert torch.allclose(sample["keypoints"][0], torch.tensor(expected), atol=1e-4)
    assert (train.name, train.eye_indices, train.metric) == ("aflw_m", (0, 1), "iod")
    assert_mark_at_keypoint(train, 0, landmark=0)


def test_aflw_m_test_from_mtfl_is_one_based(tmp_path):
    test = AFLW_M(make_aflw_m(tmp_path / "aflw"), "test", normalize=False)
    assert len(test) == 2 and Path(test.paths[1]).name == "10-image2.jpg"  # backslash path accepted
    expected = [[(50 - 1) * 136 / 150 - 20, (60 - 1) * 136 / 150 - 20],
                [(100 - 1) * 136 / 150 - 20, (62 - 1) * 136 / 150 - 20]]
    assert torch.allclose(test[0]["keypoints"][:2], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(test, 0, landmark=0)
    assert_mark_at_keypoint(test, 1, landmark=0)


def test_aflw_m_errors(tmp_path):
    root = make_aflw_m(tmp_path / "aflw")
    mtfl = root / "MTFL/testing.txt"
    mtfl.write_text(mtfl.read_text().replace(" 1 2 2 3", " 1 2"))
    with pytest.raises(DatasetError, match="testing.txt to hold .* line 1 has 13 columns"):
        AFLW_M(root, "test")
    csv_path = root / "aflw_cropped/facedata_cropped.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:3] + [lines[3] + ",7"] + lines[4:]))
    with pytest.raises(DatasetError, match="line 4 has 15 columns"):
        AFLW_M(root, "train", val_size=1)
    csv_path.write_text("\n".join([lines[0].replace("crop_file", "crop")] + lines[1:]))
    with pytest.raises(DatasetError, match="header naming image_file, set, crop_file"):
        AFLW_M(root, "train", val_size=1)
    csv_path.write_text("\n".join(lines))
    save_image(root / "aflw_cropped/cropped/0_crop.jpg", 150, 140)
    dataset = AFLW_M(root, "train", val_size=1)
    with pytest.raises(DatasetError, match="0_crop.jpg to be a 150x150 image"):
        dataset[[Path(p).name for p in dataset.paths].index("0_crop.jpg")]


# ---------------------------------------------------------------------------------------------
# AFLW, recropped version
# ---------------------------------------------------------------------------------------------
def make_aflw_r(root):
    # images of 120 (w) x 90 (h) px; gt holds (y, x): point 0 of image i is x = 30 + i, y = 40
    for subset, count in (("train", 4), ("test", 1)):
        names = [f"{subset}/face{i}.jpg" for i in range(count)]
        gt = np.zeros((count, 5, 2))
        for i in range(count):
            gt[i, :, 0] = [40, 42, 60, 70, 70]  # y
            gt[i, :, 1] = [30 + i, 90, 60, 40, 80]  # x
            save_image(root / "output" / names[i], 120, 90, [(30 + i, 40)])
        write(root / f"aflw_{subset}_images.txt", "\n".join(names) + "\n")
        scipy.io.savemat(root / f"aflw_{subset}_keypoints.mat",
                         {"gt": gt, "hw": np.tile([90.0, 120.0], (count, 1))})
    return root


def test_aflw_r_reads_y_x_and_scales_by_w_h(tmp_path):
    root = make_aflw_r(tmp_path / "aflw_r")
    assert (len(AFLW_R(root, "train", val_size=1)), len(AFLW_R(root, "val", val_size=1))) == (3, 1)
    test = AFLW_R(root, "test", normalize=False)
    sample = check_sample(test, 0, num_landmarks=5)
    expected = [[30 * 136 / 120 - 20, 40 * 136 / 90 - 20],  # gt stored (40, 30) as (y, x)
                [90 * 136 / 120 - 20, 42 * 136 / 90 - 20]]
    assert torch.allclose(sample["keypoints"][:2], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(test, 0, landmark=0)


def test_aflw_r_errors(tmp_path):
    root = make_aflw_r(tmp_path / "aflw_r")
    write(root / "aflw_test_images.txt", "test/face0.jpg\ntest/face1.jpg\n")
    with pytest.raises(DatasetError, match=r"gt is \(1, 5, 2\) .* 2 images"):
        AFLW_R(root, "test")
    scipy.io.savemat(root / "aflw_test_keypoints.mat", {"gt": np.zeros((2, 5, 2))})
    with pytest.raises(DatasetError, match="has no variable 'hw'"):
        AFLW_R(root, "test")
    scipy.io.savemat(root / "aflw_test_keypoints.mat", {"gt": np.zeros((2, 5, 2)),
                                                        "hw": np.tile([80.0, 120.0], (2, 1))})
    with pytest.raises(DatasetError, match="face0.jpg to be a 120x80 image .* it is 120x90"):
        AFLW_R(root, "test")[0]


# ---------------------------------------------------------------------------------------------
# 300W
# ---------------------------------------------------------------------------------------------
W300_IMAGES = {  # .mat subset -> (folder, image names); ibug's second entry has no image in 300W
    "afw": ("afw", ["134212_1.jpg"]), "helen_trainset": ("helen/trainset", ["100032540_1.jpg"]),
    "lfpw_trainset": ("lfpw/trainset", ["image_0001.png"]),
    "helen_testset": ("helen/testset", ["2815178_1.jpg"]),
    "lfpw_testset": ("lfpw/testset", ["image_0001.png"]),
    "ibug": ("ibug", ["image_003_1.jpg", "face_only_in_the_mat.jpg"])}
BOX = (41, 31, 144, 134)  # 1-based xmin, ymin, xmax, ymax: 104 px wide


def pts_text(points):
    rows = "".join(f"{x:.3f} {y:.3f}\n" for x, y in points)
    return f"version: 1\nn_points:  68\n{{\n{rows}}}\n"


def make_300w(root):
    for subset, (folder, names) in W300_IMAGES.items():
        cells = np.empty((1, len(names)), dtype=object)  # a 1xN cell array of 1x1 structs
        for i, name in enumerate(names):
            cells[0, i] = {"imgName": name, "bb_detector": np.array([[40.0, 30, 150, 140]]),
                           "bb_ground_truth": np.array([BOX], dtype=float)}
        (root / "Bounding Boxes").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / f"Bounding Boxes/bounding_boxes_{subset}.mat",
                         {"bounding_boxes": cells})
        if subset == "ibug":
            names = names[:1]
        for name in names:  # point 0 at (93, 83), 1-based; the rest spread over the face
            points = [(93, 83)] + [(41 + k, 31 + k) for k in range(1, 68)]
            save_image(root / folder / name, 200, 180, [(92, 82)])
            write(root / folder / (name.rsplit(".", 1)[0] + ".pts"), pts_text(points))
    return root


@pytest.mark.parametrize("squeeze_me", [False, True])
def test_300w_splits_ibug_filter_and_keypoints(tmp_path, monkeypatch, squeeze_me):
    root = make_300w(tmp_path / "300w")
    layout = scipy.io.loadmat(root / "Bounding Boxes/bounding_boxes_ibug.mat")["bounding_boxes"]
    assert layout[0, 1]["imgName"][0, 0][0] == "face_only_in_the_mat.jpg"  # the real nesting
    monkeypatch.setattr(scipy.io, "loadmat",
                        functools.partial(scipy.io.loadmat, squeeze_me=squeeze_me))
    train, val = W300(root, "train", val_size=1), W300(root, "val", val_size=1)
    assert sorted(Path(p).relative_to(root).as_posix() for p in train.paths + val.paths) == [
        "afw/134212_1.jpg", "helen/trainset/100032540_1.jpg", "lfpw/trainset/image_0001.png"]
    test = W300(root, "test", normalize=False)
    assert [Path(p).relative_to(root).as_posix() for p in test.paths] == [
        "helen/testset/2815178_1.jpg", "lfpw/testset/image_0001.png", "ibug/image_003_1.jpg"]
    sample = check_sample(test, 2, num_landmarks=68)
    assert (test.name, test.eye_indices, test.metric) == ("300w", (36, 45), "iod")
    # Protocol steps in the scaled image: box 52 px wide, 100 px window centred on the box and
    # shifted 2 px up (its pixel 0 is 49.5 px before the centre), points minus 1, -> 136, crop 20.
    f = 52 / (144 - 41 + 1)
    x0 = f * ((41 + 144) / 2 - 1) - 49.5
    y0 = f * ((31 + 134) / 2 - 1) - 2 - 49.5
    expected = [(f * (93 - 1) - x0) * 136 / 100 - 20, (f * (83 - 1) - y0) * 136 / 100 - 20]
    assert torch.allclose(sample["keypoints"][0], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(test, 2, landmark=0)


def test_300w_pads_with_black_outside_the_image(tmp_path):
    root = make_300w(tmp_path / "300w")
    save_image(root / "helen/testset/2815178_1.jpg", 200, 180, background=255)
    cells = np.empty((1, 1), dtype=object)  # box near the top-left corner: window leaves the image
    cells[0, 0] = {"imgName": "2815178_1.jpg", "bb_ground_truth": np.array([[5.0, 5, 108, 108]])}
    scipy.io.savemat(root / "Bounding Boxes/bounding_boxes_helen_testset.mat",
                     {"bounding_boxes": cells})
    image = W300(root, "test", normalize=False)[0]["image"]
    # source x = -0.5 (the image's left edge) lands at (-0.5 - (55.5 - 99)) * 0.68 - 20 = 9.24
    assert (image[:, 40, :8] == 0).all() and (image[:, 40, 12:85] == 1).all()
    # source y = -0.5 lands at (-0.5 - (55.5 - 103)) * 0.68 - 20 = 11.96
    assert (image[:, :10, 40] == 0).all() and (image[:, 14:75, 40] == 1).all()


def test_300w_errors(tmp_path):
    root = make_300w(tmp_path / "300w")
    pts = root / "afw/134212_1.pts"
    good = pts.read_text()
    pts.write_text(good.replace("n_points:  68", "n_points:  67"))
    with pytest.raises(DatasetError, match=r"134212_1.pts to hold a 300W .pts file.* starts"):
        W300(root, "train", val_size=1)
    pts.write_text(good.replace("}\n", ""))
    with pytest.raises(DatasetError, match=r"134212_1.pts .* ends"):
        W300(root, "train", val_size=1)
    pts.write_text(good.replace("42.000 32.000\n", ""))
    with pytest.raises(DatasetError, match="it has 67 point lines"):
        W300(root, "train", val_size=1)
    pts.write_text(good.replace("42.000 32.000", "42.000 32.000 1"))
    with pytest.raises(DatasetError, match="line 5 has 3 columns"):
        W300(root, "train", val_size=1)
    pts.unlink()
    with pytest.raises(DatasetError, match=r"300W .pts file.* at .*134212_1.pts"):
        W300(root, "train", val_size=1)
    (root / "Bounding Boxes/bounding_boxes_ibug.mat").unlink()
    with pytest.raises(DatasetError, match="bounding_boxes_ibug.mat, but there is no such file"):
        W300(root, "test")
    scipy.io.savemat(root / "Bounding Boxes/bounding_boxes_ibug.mat", {"boxes": np.zeros(3)})
    with pytest.raises(DatasetError, match="has no variable 'bounding_boxes'"):
        W300(root, "test")
    scipy.io.savemat(root / "Bounding Boxes/bounding_boxes_ibug.mat", {"bounding_boxes": np.zeros(3)})
    with pytest.raises(DatasetError, match="ibug.mat to hold 'bounding_boxes', a cell array of structs.* entry 1"):
        W300(root, "test")
    (root / "Bounding Boxes/bounding_boxes_ibug.mat").write_text("not a mat file")
    with pytest.raises(DatasetError, match="not a readable .mat file"):
        W300(root, "test")


# ---------------------------------------------------------------------------------------------
# CUB-200-2011
# ---------------------------------------------------------------------------------------------
CUB_IMAGES = ["001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
              "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg",
              "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
              "002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg"]


def make_cub(root, with_part_names=True):
    write(root / "images.txt", "".join(f"{i + 1} {p}\n" for i, p in enumerate(CUB_IMAGES)))
    write(root / "train_test_split.txt", "1 1\n2 1\n3 1\n4 0\n")
    rows = []
    for i, path in enumerate(CUB_IMAGES):
        save_image(root / "images" / path, 200, 150, [(100 + i, 60)])
        for part in range(1, 16):
            # the beak (part 2) is at (100 + i, 60); the tail (part 14) is hidden: 0 0 not visible
            x, y, seen = {2: (100 + i, 60, 1), 14: (0, 0, 0)}.get(part, (5 * part, 7, 1))
            rows.append(f"{i + 1} {part} {x:.1f} {y:.1f} {seen}\n")
    write(root / "parts/part_locs.txt", "".join(rows))
    write(root / "bounding_boxes.txt", "".join(f"{i} 10.0 20.0 150.0 100.0\n" for i in range(1, 5)))
    write(root / "image_class_labels.txt", "1 1\n2 1\n3 2\n4 2\n")
    write(root / "classes.txt", "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    if with_part_names:
        write(root / "parts/parts.txt", "".join(f"{k + 1} {name}\n" for k, name in enumerate(
            ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
             "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"])))
    write(root / "splits/train.txt", f"{CUB_IMAGES[2]}\n{CUB_IMAGES[0]}\n")
    return root


def test_cub_split_file_keypoints_and_visibility(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    dataset = CUB(root, "train", normalize=False, split_file=root / "splits/train.txt")
    relative = [Path(p).relative_to(root / "images").as_posix() for p in dataset.paths]
    assert relative == [CUB_IMAGES[2], CUB_IMAGES[0]]  # the split file's order
    sample = check_sample(dataset, 0, num_landmarks=15)
    assert dataset.landmark_names[6] == "left eye" and dataset.landmark_names[13] == "tail"
    assert (dataset.metric, dataset.eye_indices) == ("pck", None)
    assert dataset.mean == (0.485, 0.456, 0.406) and dataset.std == (0.229, 0.224, 0.225)
    assert sample["visible"].tolist() == [True] * 13 + [False, True]  # the tail is hidden
    # whole 200x150 image -> 96x96, edges on edges: (p + 0.5) * 96 / size - 0.5; image 3: beak x 102
    expected = [(102 + 0.5) * 96 / 200 - 0.5, (60 + 0.5) * 96 / 150 - 0.5]
    assert torch.allclose(sample["keypoints"][1], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(dataset, 0, landmark=1)


def test_cub_official_split_and_default_part_names(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", with_part_names=False)
    sizes = [len(CUB(root, split, val_size=1)) for split in ("train", "val", "test")]
    assert sizes == [2, 1, 1]
    assert CUB(root, "test").landmark_names[1] == "beak"


def test_cub_errors(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    write(root / "splits/bad.txt", "003.Nowhere/bird.jpg\n")
    with pytest.raises(DatasetError, match="'003.Nowhere/bird.jpg' is not"):
        CUB(root, split_file=root / "splits/bad.txt")
    locs = root / "parts/part_locs.txt"
    good = locs.read_text()
    locs.write_text(good.replace("1 15 75.0 7.0 1\n", ""))
    with pytest.raises(DatasetError, match="image 1 lacks some of the 15 parts"):
        CUB(root, "test", val_size=1)
    locs.write_text(good.replace("1 15 75.0 7.0 1\n", "1 16 75.0 7.0 1\n"))
    with pytest.raises(DatasetError, match="line 15 names an unknown image or part"):
        CUB(root, "test", val_size=1)
    locs.write_text(good.replace("1 15 75.0 7.0 1\n", "1 15 75.0 7.0\n"))
    with pytest.raises(DatasetError, match="line 15 has 4 columns"):
        CUB(root, "test", val_size=1)


# ---------------------------------------------------------------------------------------------
# Cat heads, CSV keypoints, unlabelled folders
# ---------------------------------------------------------------------------------------------
CAT_POINTS = [(100, 100), (140, 100), (120, 130), (80, 70), (85, 30), (100, 60), (140, 60),
              (155, 30), (160, 70)]  # eyes, mouth, left ear 1-3, right ear 1-3 (tips: 85, 155)


def make_cats(root, count=5):
    for i in range(count):
        name = root / f"CAT_0{i % 2}" / f"0000000{i}_000.jpg"
        save_image(name, 220, 200, [(100, 60)])  # marks the left ear's third point
        points = " ".join(f"{x} {y}" for x, y in CAT_POINTS)
        write(name.with_name(name.name + ".cat"), f"9 {points} \n")  # trailing space, as shipped
    return root


def test_cat_heads_drop_ear_tips_and_crop(tmp_path):
    root = make_cats(tmp_path / "cats")
    sizes = [len(CatHeads(root, s, val_size=1, test_size=1)) for s in ("train", "val", "test")]
    assert sizes == [3, 1, 1]
    dataset = CatHeads(root, "test", normalize=False, val_size=1, test_size=1)
    sample = check_sample(dataset, 0, num_landmarks=7)
    # box of all 9 points: x 80..160, y 30..130 -> square side 1.5 * 100 = 150 centred at (120, 80)
    # -> left 45, top 5, resized 150 -> 96
    kept = [(100, 100), (140, 100), (120, 130), (80, 70), (100, 60), (140, 60), (160, 70)]
    expected = [[(x - 45) * 96 / 150, (y - 5) * 96 / 150] for x, y in kept]
    assert torch.allclose(sample["keypoints"], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(dataset, 0, landmark=4)


def test_cat_heads_errors(tmp_path):
    with pytest.raises(DatasetError, match="found none"):
        CatHeads(tmp_path)
    root = make_cats(tmp_path / "cats")
    write(root / "CAT_00/00000000_000.jpg.cat", "8 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n")
    with pytest.raises(DatasetError, match="00000000_000.jpg.cat to hold a .cat file .* 17 fields"):
        CatHeads(root, val_size=1, test_size=1)


def make_csv(root):
    write(root / "train.csv", "image,head_x,head_y,head_v,lwrist_x,lwrist_y,lwrist_v\n"
          "frames/0001.png,10,20,1,30.5,40,0\nframes/0002.png,50,60,1,70,80,1\n")
    save_image(root / "frames/0001.png", 160, 120, [(10, 20)])
    save_image(root / "frames/0002.png", 160, 120, [(50, 60)])
    write(root / "single.csv", "frames/0002.png,50,60,70,80\n")
    return root


def test_csv_keypoints(tmp_path):
    root = make_csv(tmp_path / "bbc")
    dataset = CSVKeypoints(root, "train", normalize=False, size=128, with_visible=True,
                           metric="pck")
    assert dataset.landmark_names == ["head", "lwrist"] and dataset.metric == "pck"
    sample = check_sample(dataset, 0, num_landmarks=2)
    assert sample["image"].shape == (3, 128, 128) and sample["visible"].tolist() == [True, False]
    expected = [[(10 + 0.5) * 128 / 160 - 0.5, (20 + 0.5) * 128 / 120 - 0.5],
                [(30.5 + 0.5) * 128 / 160 - 0.5, (40 + 0.5) * 128 / 120 - 0.5]]
    assert torch.allclose(sample["keypoints"], torch.tensor(expected), atol=1e-4)
    assert_mark_at_keypoint(dataset, 0, landmark=0)
    single = CSVKeypoints(root / "single.csv", "test", size=(48, 64))  # no header, no visibility
    assert single.size == (48, 64) and single.landmark_names == ["point 0", "point 1"]
    assert check_sample(single, 0)["visible"].all()


def test_csv_keypoints_errors(tmp_path):
    root = make_csv(tmp_path / "bbc")
    with pytest.raises(DatasetError, match="val.csv, but there is no such file"):
        CSVKeypoints(root, "val")
    write(root / "train.csv", "frames/0001.png,10,20,30,40\nframes/0002.png,50,60,70\n")
    with pytest.raises(DatasetError, match="line 2 has 4 columns instead of 5"):
        CSVKeypoints(root, "train")
    with pytest.raises(DatasetError, match="line 1 has 5 columns"):
        CSVKeypoints(root, "train", with_visible=True)


def test_image_folder_unlabelled(tmp_path):
    root = tmp_path / "aves"
    save_image(root / "a/bird1.png", 100, 60, [(50, 30)])
    save_image(root / "a/b/bird2.JPG", 64, 64)
    save_image(root / "c/bird3.jpeg", 80, 120)
    write(root / "a/notes.txt", "not an image")
    dataset = ImageFolderUnlabelled(root, normalize=False)
    assert [Path(p).name for p in dataset.paths] == ["bird2.JPG", "bird1.png", "bird3.jpeg"]
    sample = check_sample(dataset, 1, num_landmarks=0)
    assert sample["keypoints"].shape == (0, 2) and sample["identity"] == -1
    # shorter side 60 -> 96 (x1.6), centre crop: the 60 px wide middle starts at x = 20
    expected = torch.tensor([(50 + 0.5 - 20) * 1.6 - 0.5, (30 + 0.5) * 1.6 - 0.5]).double()
    assert torch.allclose(mark_centre(sample["image"]), expected, atol=0.1)
    (tmp_path / "list.txt").write_text("aves/c/bird3.jpeg\naves/a/bird1.png\n")
    listed = ImageFolderUnlabelled(tmp_path / "list.txt", size=32)
    assert len(listed) == 2 and listed[0]["image"].shape == (3, 32, 32)
    split = [ImageFolderUnlabelled(root, s, val_size=1).paths for s in ("train", "val")]
    assert len(split[0]) == 2 and len(split[1]) == 1 and not set(split[0]) & set(split[1])
    with pytest.raises(ValueError, match="no test split"):
        ImageFolderUnlabelled(root, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="found none"):
        ImageFolderUnlabelled(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such folder"):
        ImageFolderUnlabelled(tmp_path / "missing")


def test_datasets_by_name(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    mafl = make_dataset("mafl", "test", root=root, normalize=False)
    assert isinstance(mafl, MAFL) and mafl[0]["image"].shape == (3, 96, 96) and mafl.normalize is False
    assert make_dataset("celeba", "val", root=root).paths == CelebA(root, "val").paths
    with pytest.raises(DatasetError, match="reference preprocessing to 96x96 images; got --image-size 64"):
        make_dataset("mafl", "test", root=root, size=64)
    with pytest.raises(DatasetError, match="pass its folder with --data-root"):
        make_dataset("mafl", "test")
    with pytest.raises(DatasetError, match="unknown dataset 'mafl-hq'"):
        make_dataset("mafl-hq", root=root)
    csv = make_dataset("csv", "train", root=make_csv(tmp_path / "bbc"), size=64, with_visible=True)
    assert csv[0]["image"].shape == (3, 64, 64)  # CSV files and image folders keep any size
