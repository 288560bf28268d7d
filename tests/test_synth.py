"""The built-in synthetic data: sample format, determinism, identities, splits, exact landmarks, visibility.

Landmarks are checked against what was drawn: `render(params, with_labels=True)` also returns the label
map (one id per kind of primitive, names in `dataset.label_names`), so a test can ask which part lies
under a landmark, or where the centroid of a drawn eye is.
"""
import math

import numpy as np
import pytest
import torch

from data import SyntheticBirds, SyntheticFaces, contact_sheet

DATASETS = {
    "faces": lambda **kw: SyntheticFaces(**kw),
    "faces-dense": lambda **kw: SyntheticFaces(annotation="dense", **kw),
    "faces-wild": lambda **kw: SyntheticFaces(variant="wild", **kw),
    "faces-clutter": lambda **kw: SyntheticFaces(variant="clutter", **kw),
    "birds": lambda **kw: SyntheticBirds(**kw),
}


def labels_at(dataset, labels, points):
    """Names of the labels under (K, 2) pixel points (nearest pixel centre)."""
    x, y = np.rint(points.numpy()).astype(int).T
    return [dataset.label_names[i] for i in labels.numpy()[y, x]]


def centroid(mask):
    """(x, y) centroid of a boolean (H, W) array, in pixel-centre coordinates."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


# ---------------------------------------------------------------------------------------------------------
# format and attributes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DATASETS)
def test_sample_format_and_attributes(kind):
    dataset = DATASETS[kind](split="val", length=8)
    sample = dataset[3]
    k = dataset.num_landmarks
    assert set(sample) == {"image", "keypoints", "visible", "identity", "index", "mask"}
    assert sample["image"].shape == (3, 96, 96) and sample["image"].dtype == torch.float32
    assert sample["keypoints"].shape == (k, 2) and sample["keypoints"].dtype == torch.float32
    assert sample["visible"].shape == (k,) and sample["visible"].dtype == torch.bool
    assert sample["mask"].shape == (1, 96, 96) and sample["mask"].dtype == torch.float32
    assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    assert sample["index"] == 3 and isinstance(sample["identity"], int)
    assert len(dataset) == 8 and dataset.size == (96, 96) and dataset.has_mask
    assert dataset.poses_per_identity == 4 and len(dataset.landmark_names) == k
    raw = DATASETS[kind](split="val", length=8, normalize=False)[3]["image"]
    assert raw.min() >= 0 and raw.max() <= 1
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    assert torch.allclose(sample["image"], (raw - mean) / std, atol=1e-5)
    if kind == "birds":
        assert (dataset.name, dataset.metric, dataset.eye_indices, k) == ("synth-birds", "pck", None, 15)
        assert dataset.mean == (0.485, 0.456, 0.406) and dataset.std == (0.229, 0.224, 0.225)
        assert dataset.landmark_names[:3] == ["back", "beak", "belly"]
        assert dataset.landmark_names[-1] == "throat"
    else:
        assert dataset.metric == "iod" and dataset.mean == (0.5084, 0.4224, 0.3769)
        assert dataset.std == (0.2599, 0.2371, 0.2323)


def test_names_default_lengths_and_errors():
    assert [len(SyntheticFaces(split=s)) for s in ("train", "val", "test")] == [10000, 1000, 1000]
    assert len(SyntheticBirds(split="test")) == 1000
    names = [SyntheticFaces(variant=v, annotation=a).name
             for v in ("aligned", "wild") for a in ("mafl", "dense")]
    assert names == ["synth-faces", "synth-faces-dense", "synth-faces-wild", "synth-faces-wild-dense"]
    assert SyntheticFaces(variant="clutter").name == "synth-faces-clutter"
    assert SyntheticFaces().landmark_names == ["left eye", "right eye", "nose tip", "left mouth corner",
                                               "right mouth corner"]
    assert SyntheticFaces().eye_indices == (0, 1)
    for bad in (dict(split="training"), dict(variant="profile"), dict(annotation="68"), dict(size=(96, 64))):
        with pytest.raises(ValueError) as error:  # data.DatasetError, a ValueError
            SyntheticFaces(**bad)
        assert type(error.value).__name__ == "DatasetError"


def test_dense_annotation():
    dense = SyntheticFaces(annotation="dense", length=8)
    names = dense.landmark_names
    assert dense.num_landmarks >= 20 and len(set(names)) == len(names)
    assert [names[i] for i in dense.eye_indices] == ["left eye outer corner", "right eye outer corner"]
    for prefix in ("jaw", "left brow", "right brow", "nose", "left eye", "right eye", "upper lip",
                   "lower lip"):
        assert any(name.startswith(prefix) for name in names), prefix
    # Dense and MAFL annotations of one index describe the same face: same image, shared points coincide.
    for variant in ("aligned", "wild"):
        dense, mafl = (SyntheticFaces(variant=variant, annotation=a, length=8) for a in ("dense", "mafl"))
        for i in range(4):
            d, m = dense[i]["keypoints"], mafl[i]["keypoints"]
            assert torch.allclose(d[names.index("nose tip")], m[2], atol=1e-4)
            assert torch.allclose(d[names.index("left mouth corner")], m[3], atol=1e-4)
            assert torch.allclose(d[names.index("right mouth corner")], m[4], atol=1e-4)
            assert torch.equal(dense[i]["image"], mafl[i]["image"])


# ---------------------------------------------------------------------------------------------------------
# determinism, identities, splits
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DATASETS)
def test_deterministic_in_seed_split_index(kind):
    a, b = DATASETS[kind](length=8, seed=3)[5], DATASETS[kind](length=8, seed=3)[5]
    for key in ("image", "keypoints", "visible", "mask"):
        assert torch.equal(a[key], b[key]), key
    other_seed = DATASETS[kind](length=8, seed=4)[5]
    other_split = DATASETS[kind](split="val", length=8, seed=3)[5]
    assert not torch.equal(a["image"], other_seed["image"])
    assert not torch.equal(a["image"], other_split["image"])
    assert not torch.allclose(a["keypoints"], DATASETS[kind](length=8, seed=3)[6]["keypoints"])


@pytest.mark.parametrize("kind", ["faces", "birds"])
def test_identities_shared_by_poses(kind):
    dataset = DATASETS[kind](length=16)
    p = dataset.poses_per_identity
    ids = [dataset[i]["identity"] for i in range(16)]
    assert ids == [i // p for i in range(16)]
    params = [dataset.params(i) for i in range(2 * p)]
    identity_keys = dataset.identity_params(0).keys()
    pose_keys = set(params[0]) - set(identity_keys)
    for i in range(1, p):  # same identity: identical identity parameters, different pose and image
        assert all(params[i][key] == params[0][key] for key in identity_keys)
        assert any(params[i][key] != params[0][key] for key in pose_keys)
        assert not torch.equal(dataset[i]["image"], dataset[0]["image"])
    assert all(params[p][key] != params[0][key] for key in identity_keys if isinstance(params[0][key], float))
    assert dataset.identity_params(ids[0]) == {key: params[0][key] for key in identity_keys}


@pytest.mark.parametrize("kind", ["faces", "birds"])
def test_splits_disjoint_by_identity(kind):
    identities = {}
    for split in ("train", "val", "test"):
        dataset = DATASETS[kind](split=split)
        identities[split] = {dataset.identity(i) for i in range(len(dataset))}
        assert len(identities[split]) == len(dataset) // dataset.poses_per_identity
    assert not identities["train"] & identities["val"]
    assert not identities["train"] & identities["test"]
    assert not identities["val"] & identities["test"]
    # Different ids mean different people: the first identities of the splits do not look alike.
    first = [DATASETS[kind](split=s).params(0) for s in ("train", "val", "test")]
    keys = DATASETS[kind]().identity_params(0).keys()
    assert first[0] != first[1]
    assert all(first[0][k] != first[2][k] for k in keys if isinstance(first[0][k], float))


def test_wild_varies_scale_rotation_and_position_aligned_does_not():
    def eye_lines(dataset):
        eyes = torch.stack([dataset[i]["keypoints"][:2] for i in range(48)])  # (48, 2, 2)
        delta = eyes[:, 1] - eyes[:, 0]
        return delta.norm(dim=1), torch.rad2deg(torch.atan2(delta[:, 1], delta[:, 0])), eyes.mean(1)

    iod, angle, centre = eye_lines(SyntheticFaces(length=48))
    assert iod.max() / iod.min() < 1.5 and angle.abs().max() < 8 and centre.std(0).max() < 3
    iod, angle, centre = eye_lines(SyntheticFaces(variant="wild", length=48))
    assert iod.max() / iod.min() > 1.8 and angle.abs().max() > 20 and centre.std(0).min() > 8


def test_clutter_is_the_aligned_faces_in_wild_scenes():
    aligned, clutter = SyntheticFaces(length=16), SyntheticFaces(variant="clutter", length=16)
    plain = aligned.label_names.index("background")
    covered = []
    for i in range(16):
        assert clutter.params(i) == aligned.params(i)  # the same person, pose and expression
        a, c = aligned.render(aligned.params(i), True), clutter.render(clutter.params(i), True)
        assert torch.equal(a["keypoints"], c["keypoints"]) and torch.equal(a["visible"], c["visible"])
        # aligned: one flat background label; clutter: background shapes where the person is not (random
        # shapes can land behind the person, so their share of the background is checked on average)
        outside = a["labels"] == plain
        assert not (a["labels"][outside] != plain).any() and (c["labels"][outside] != plain).any()
        covered.append((c["labels"][outside] != plain).float().mean().item())
        assert (a["image"] - c["image"]).abs()[:, outside].mean() > 0.2  # normalised units
    assert np.mean(covered) > 0.1


# ---------------------------------------------------------------------------------------------------------
# exact landmarks and masks
# ---------------------------------------------------------------------------------------------------------
def test_face_landmarks_lie_on_the_drawn_features():
    dataset = SyntheticFaces(length=64, annotation="dense")
    names = dataset.landmark_names
    eyes = [names.index(f"{side} eye {end} corner") for side in ("left", "right") for end in ("outer", "inner")]
    mafl = SyntheticFaces(length=64)
    for i in range(0, 64, 3):
        sample = mafl.render(mafl.params(i), with_labels=True)
        under = labels_at(mafl, sample["labels"], sample["keypoints"])
        assert under[0] in ("iris", "pupil") and under[1] in ("iris", "pupil"), under
        assert under[2] == "nose tip", under
        assert sample["keypoints"][0, 0] < sample["keypoints"][1, 0]  # CelebA: "left eye" = image left
        mouth_labels = [mafl.label_names.index(n) for n in ("lips", "mouth", "teeth")]
        mouth = np.isin(sample["labels"].numpy(), mouth_labels)
        for x, y in np.rint(sample["keypoints"][3:].numpy()).astype(int):  # mouth corners: on the mouth ...
            assert mouth[y - 1:y + 2, x - 1:x + 2].any()
        columns = np.nonzero(mouth)[1]  # ... at its left and right ends
        assert abs(columns.min() - sample["keypoints"][3, 0]) <= 1.0
        assert abs(columns.max() - sample["keypoints"][4, 0]) <= 1.0
        dense = dataset.render(dataset.params(i), with_labels=True)
        sclera = dense["labels"].numpy() == dataset.label_names.index("sclera")
        for x, y in np.rint(dense["keypoints"][eyes].numpy()).astype(int):  # eye corners: on the eye's tip
            assert sclera[y - 1:y + 2, x - 1:x + 2].any()


def test_the_gaze_moves_the_iris_landmark_and_not_the_eye_corners():
    """A MAFL eye is the centre of the iris (it follows the gaze); the dense eye corners stay put."""
    mafl, dense = SyntheticFaces(length=4), SyntheticFaces(annotation="dense", length=4)
    corners = [dense.landmark_names.index(f"{side} eye {end} corner") for side in ("left", "right")
               for end in ("outer", "inner")]
    params = dense.params(1)
    looks = {gaze: dict(params, gaze_x=gaze, gaze_y=0.0) for gaze in (-1.0, 1.0)}
    left, right = (mafl.render(looks[g])["keypoints"] for g in (-1.0, 1.0))
    assert ((right - left)[:2, 0] > 0.5).all() and torch.allclose(left[2:], right[2:])  # both irises move right
    assert torch.allclose(dense.render(looks[-1.0])["keypoints"][corners],
                          dense.render(looks[1.0])["keypoints"][corners])


@pytest.mark.parametrize("size", [96, 192])
def test_drawn_eye_and_nose_tip_centroids_match_their_landmarks(size):
    """Pixel-centre convention: a drawn disc's centroid lies on its analytic centre (< 0.5 px)."""
    dataset = SyntheticFaces(size=size, length=16, normalize=False)
    for i in range(0, 16, 3):
        params = dict(dataset.params(i), eye_open=1.0, gaze_x=0.0, gaze_y=0.0, iris=0.42)  # iris unclipped
        sample = dataset.render(params, with_labels=True)
        labels, keypoints = sample["labels"].numpy(), sample["keypoints"].numpy()
        eye = np.isin(labels, [dataset.label_names.index("iris"), dataset.label_names.index("pupil")])
        middle = int(round(keypoints[:2, 0].mean()))
        for k, side in ((0, eye[:, :middle]), (1, eye[:, middle:])):
            found = centroid(side) + [0 if k == 0 else middle, 0]
            assert np.abs(found - keypoints[k]).max() < 0.5, (i, k, found, keypoints[k])
        tip = centroid(labels == dataset.label_names.index("nose tip"))
        assert np.abs(tip - keypoints[2]).max() < 0.5


@pytest.mark.parametrize("kind", ["faces", "faces-wild", "birds"])
def test_masks_are_the_exact_foreground(kind):
    dataset = DATASETS[kind](length=24)
    not_foreground = {"background", "clutter", "occluder", "perch"}
    names = np.array(dataset.label_names)
    for i in range(0, 24, 5):
        sample = dataset.render(dataset.params(i), with_labels=True)
        expected = ~np.isin(names[sample["labels"].numpy()], list(not_foreground))
        assert torch.equal(sample["mask"][0], torch.from_numpy(expected.astype(np.float32)))
        assert 0.05 < sample["mask"].mean() < 0.95
        if kind in ("faces", "birds"):  # plain scenes: every visible landmark is on the foreground
            x, y = np.rint(sample["keypoints"][sample["visible"]].numpy()).astype(int).T
            assert (sample["mask"][0].numpy()[y, x] == 1).all()


@pytest.mark.parametrize("kind", DATASETS)
def test_any_resolution_scales_keypoints(kind):
    small, large = DATASETS[kind](size=64, length=8), DATASETS[kind](size=128, length=8)
    for i in (0, 5):
        a, b = small[i], large[i]
        assert a["image"].shape == (3, 64, 64) and b["image"].shape == (3, 128, 128)
        assert b["mask"].shape == (1, 128, 128)
        # Normalised coordinates 2 kp / (S - 1) - 1 do not depend on the size S.
        assert torch.allclose(a["keypoints"] / 63, b["keypoints"] / 127, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# birds: honest visibility
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("facing_right", [0, 1])
def test_bird_side_view_hides_the_far_side(facing_right):
    dataset = SyntheticBirds(length=8, size=128)
    names = dataset.landmark_names
    near, far = ("right", "left") if facing_right else ("left", "right")  # CUB: the bird's own left/right
    for i in range(0, 8, 2):
        params = dict(dataset.params(i), facing_right=facing_right, view=0.0, head_turn=0.0, head_pitch=0.0,
                      wing_raise=0.0, stride=0.25, fill=0.8, x=0.0, y=0.0)
        sample = dataset.render(params, with_labels=True)
        visible = dict(zip(names, sample["visible"].tolist()))
        assert not visible[f"{far} eye"] and not visible[f"{far} wing"], visible
        for name in (f"{near} eye", f"{near} wing", f"{near} leg", "beak", "crown", "tail", "belly"):
            assert visible[name], (name, visible)
        under = labels_at(dataset, sample["labels"], sample["keypoints"])
        assert under[names.index(f"{near} eye")] == f"{near} eye"
        assert under[names.index(f"{far} eye")] in ("head", "cap", "eye ring", f"{near} eye")
        beak, tail = sample["keypoints"][names.index("beak"), 0], sample["keypoints"][names.index("tail"), 0]
        assert (beak > tail) == bool(facing_right)


def test_bird_visibility_varies_and_matches_the_label_map():
    dataset = SyntheticBirds(length=64)
    seen = np.zeros(15, int)
    facing = set()
    for i in range(64):
        params = dataset.params(i)
        sample = dataset.render(params, with_labels=True)
        facing.add(params["facing_right"])
        visible = sample["visible"].numpy()
        seen += visible
        under = labels_at(dataset, sample["labels"], sample["keypoints"])
        for k in np.nonzero(visible)[0]:  # a visible eye, leg, wing or beak is drawn where its landmark is
            name = dataset.landmark_names[k]
            if name.endswith(("eye", "leg", "beak", "tail")):
                assert under[k] == name, (i, name, under[k])
    assert facing == {0, 1}
    assert (seen > 0).all() and (seen < 64).any()  # every part is seen, some are sometimes hidden


def test_contact_sheet_writes_a_png(tmp_path):
    path = tmp_path / "sheet.png"
    contact_sheet(SyntheticBirds(length=4), path, n=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
