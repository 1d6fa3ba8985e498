"""tfacd.data: image folders, tfds (mocked), splits, pipelines."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfacd import data


def make_folder(root: pathlib.Path, classes=("b_cat", "a_dog"), per_class=6, size=32,
                with_test=False, fmt="png"):
    rng = np.random.default_rng(0)
    for split in ("train", "test") if with_test else ("train",):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (rng.random((size, size, 3)) * 60 + 100 * index).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}")
    return root


def test_folder_classes_are_sorted_and_labels_follow(tmp_path):
    make_folder(tmp_path, classes=("zebra", "ant", "moth"), per_class=4)
    x, y, x_test, y_test, names = data.load_folder(str(tmp_path))
    assert names == ["ant", "moth", "zebra"]
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, [0] * 4 + [1] * 4 + [2] * 4)
    assert x_test is None and y_test is None


def test_folder_with_test_split_and_resizing(tmp_path):
    make_folder(tmp_path, size=40, with_test=True, fmt="jpg")
    x, _, x_test, y_test, _ = data.load_folder(str(tmp_path), image_size=32)
    assert x.shape[1:] == (32, 32, 3) and x_test.shape == (12, 32, 32, 3)
    assert len(y_test) == 12


def test_corrupt_image_is_named(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "a_dog" / "0003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="0003.png"):
        data.load_folder(str(tmp_path))


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"), ("no_train", "missing folder"),
    ("no_classes", "no class folders"), ("no_images", "no images")])
def test_bad_folders_say_what_is_wrong(tmp_path, layout, message):
    root = tmp_path / "ds"
    if layout != "missing":
        root.mkdir()
    if layout in ("no_classes", "no_images"):
        (root / "train").mkdir()
    if layout == "no_images":
        (root / "train" / "cat").mkdir()
    with pytest.raises(data.DataError, match=message):
        data.load_folder(str(root))


def test_unknown_dataset_name():
    with pytest.raises(data.DataError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")


def test_stratified_split_is_fixed_and_keeps_class_balance():
    labels = np.repeat(np.arange(5), 100)
    train1, val1 = data.stratified_split(labels, 0.1, seed=3)
    train2, val2 = data.stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(val1, val2)
    assert len(val1) == 50 and np.all(np.bincount(labels[val1]) == 10)
    assert not set(train1) & set(val1) and len(train1) + len(val1) == 500
    _, val3 = data.stratified_split(labels, 0.1, seed=4)
    assert set(val3) != set(val1)
    # Shuffled, not class by class: the first images of either split span the classes
    # (calibration and the SQNR batch take the first ones).
    assert len(set(labels[train1[:50]])) == 5 and len(set(labels[val1[:20]])) >= 3


def test_load_folder_splits_and_normalization(tmp_path):
    make_folder(tmp_path, per_class=10)
    splits = data.load(str(tmp_path), val_fraction=0.2, seed=0)
    assert len(splits.x_train) == 16 and len(splits.x_val) == 4
    assert splits.num_classes == 2 and splits.x_test is None
    np.testing.assert_allclose(splits.mean, splits.x_train.reshape(-1, 3).mean(0), rtol=1e-5)
    batches = list(data.pipeline(splits.x_train, splits.y_train, splits, 4, training=True))
    assert len(batches) == 4 and batches[0][0].shape == (4, 32, 32, 3)
    everything = np.concatenate([b[0] for b in data.pipeline(
        splits.x_train, splits.y_train, splits, 5, training=False)])
    assert abs(everything.mean()) < 1e-3 and abs(everything.std() - 1) < 1e-2


def test_pixel_grid_normalization_is_exact_on_its_8_bit_grid(tmp_path):
    make_folder(tmp_path, per_class=10)
    dataset = data.load(str(tmp_path), val_fraction=0.2, seed=0)
    grid = data.load(str(tmp_path), val_fraction=0.2, seed=0, normalization="pixel_grid")
    np.testing.assert_array_equal(grid.x_train, dataset.x_train)
    assert grid.normalization == "pixel_grid" and grid.mean.tolist() == [128.0] * 3
    np.testing.assert_array_equal(grid.dataset_mean, dataset.mean)
    np.testing.assert_array_equal(data.with_normalization(grid, "dataset").std, dataset.std)
    values = np.concatenate([b[0] for b in data.pipeline(
        grid.x_train, grid.y_train, grid, 5, training=False)])
    np.testing.assert_array_equal(values * 64 + 128, grid.x_train)      # exact in float32
    lower, upper = data.PIXEL_GRID_RANGE
    assert values.min() >= lower and values.max() <= upper
    assert (upper - lower) * 64 == 255                        # 8 bits, step 1/64
    with pytest.raises(data.DataError, match="normalization must be one of"):
        data.load(str(tmp_path), normalization="imagenet")


def test_augment_keeps_shape_and_values():
    image = np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    out = data.augment(image).numpy()
    assert out.shape == image.shape
    assert set(np.unique(out)) <= set(np.unique(image))


def test_cifar_through_mocked_tfds():
    with tfds.testing.mock_data(num_examples=20):
        splits = data.load("cifar10", val_fraction=0.25, seed=0)
    assert splits.image_shape == (32, 32, 3) and splits.num_classes == 10
    assert len(splits.x_train) + len(splits.x_val) == 20 and len(splits.x_test) == 20
