"""Datasets for tfacd experiments: CIFAR-10/100 through tensorflow-datasets, or image folders.

Every source ends up as uint8 arrays in memory (CIFAR-sized data fits easily), split into
train / validation (a fixed, stratified fraction of train) / test (when the source has one),
and served by `tf.data` pipelines with CIFAR augmentation and a normalization: per channel from
the training split's statistics (`"dataset"`), or one scalar map for every channel,
`(p - 128) / 64` (`"pixel_grid"`, `PIXEL_GRID`), whose values an 8-bit quantizer over
`PIXEL_GRID_RANGE` holds exactly.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

TFDS_NAMES = ("cifar10", "cifar100")
NORMALIZATIONS = ("dataset", "pixel_grid")
#: (mean, std) of the "pixel_grid" normalization, in pixel units, for every channel. A power
#: of two as std keeps `(p - 128) / 64` exact in float32, and the normalized values are the
#: 8-bit grid of step 1/64 over `PIXEL_GRID_RANGE`: the int8 input of a TFLite file is `p - 128`.
PIXEL_GRID = (128.0, 64.0)
PIXEL_GRID_RANGE = (-2.0, 127.0 / 64.0)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """Bad or missing data: the message names the dataset, folder or file."""


@dataclasses.dataclass
class Splits:
    """Decoded splits and what the pipelines need to know about them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: list[str]
    mean: np.ndarray          # per channel, in [0, 255] units: what the pipelines subtract
    std: np.ndarray           # and divide by (the normalization's)
    normalization: str = "dataset"
    dataset_mean: np.ndarray | None = None   # the training split's own statistics
    dataset_std: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------

def online(host: str = "www.cs.toronto.edu", timeout: float = 3.0) -> bool:
    """True if the CIFAR download host answers: tfds.load would otherwise retry for minutes."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def tfds_prepared(name: str, data_dir: str | None = None) -> bool:
    """True if tensorflow-datasets holds `name` prepared in `data_dir` (no network used)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except  # an unknown or broken builder
        return False


def load_tfds(name: str, data_dir: str | None = None, image_size: int | None = None):
    """CIFAR-10/100 from tensorflow-datasets as `(x_train, y_train, x_test, y_test, names)`."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    if name not in TFDS_NAMES:
        raise DataError(f"unknown dataset {name!r}: use one of {TFDS_NAMES} or a folder path")
    def fetch(download):
        return tfds.load(name, split=["train", "test"], data_dir=data_dir, as_supervised=True,
                         with_info=True, download=download)

    try:
        (train, test), info = fetch(download=False)      # prepared already: no network
    except Exception:  # pylint: disable=broad-except  # tfds raises several kinds here
        if not online():
            raise DataError(
                f"{name} is not prepared in --data_dir={data_dir or '~/tensorflow_datasets'} "
                "and cannot be downloaded (no network). Point --dataset at an image folder "
                "instead, laid out as ROOT/train/<class>/*.jpg "
                "(e.g. --dataset=../shared/data/cifar10-jpeg)") from None
        (train, test), info = fetch(download=True)
    x_train, y_train = _to_arrays(train)
    x_test, y_test = _to_arrays(test)
    names = list(info.features["label"].names)
    if image_size is not None:
        x_train, x_test = _resize(x_train, image_size), _resize(x_test, image_size)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), names


def _to_arrays(dataset):
    """A tfds split of (image, label) as two numpy arrays (batch_size=-1 crashes tfds' mock)."""
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(4096).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels)


def _list_split(split_dir: pathlib.Path, class_names: list[str] | None):
    if not split_dir.is_dir():
        raise DataError(f"missing folder: {split_dir}")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg)")
    if class_names is not None and found != class_names:
        raise DataError(f"class folders of {split_dir} differ from train's: {found}")
    paths, labels = [], []
    for label, name in enumerate(found):
        files = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}")
    return paths, np.asarray(labels, np.int64), found


def _decode(path: pathlib.Path, image_size: int | None) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, np.uint8)
    except Exception as error:  # pylint: disable=broad-except
        raise DataError(f"corrupt or unreadable image: {path} ({error})") from None


def _decode_all(paths, image_size):
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = list(pool.map(lambda p: _decode(p, image_size), paths))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:4]}...: pass an "
                        "image size to resize them")
    return np.stack(images)


def load_folder(root: str, image_size: int | None = None):
    """An image folder `root/train/<class>/*` (and optional `root/test/<class>/*`).

    Class order is the sorted folder names. Returns `(x_train, y_train, x_test, y_test,
    names)`, with `x_test`/`y_test` None when there is no test folder.
    """
    root_path = pathlib.Path(root)
    if not root_path.is_dir():
        raise DataError(f"dataset folder does not exist: {root}")
    paths, y_train, names = _list_split(root_path / "train", None)
    x_train = _decode_all(paths, image_size)
    x_test = y_test = None
    if (root_path / "test").is_dir():
        test_paths, y_test, _ = _list_split(root_path / "test", names)
        x_test = _decode_all(test_paths, image_size or x_train.shape[1])
    return x_train, y_train, x_test, y_test, names


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    resized = tf.image.resize(images, (size, size), antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Splits and pipelines
# ------------------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int):
    """Indices `(train, val)`: `val_fraction` of every class, chosen with a fixed seed.

    Both come in a fixed shuffled order, not sorted: image folders are read class by class,
    and whatever takes the first images of a split (clip calibration, the SQNR batch,
    `--limit`) must see every class, not only the first one."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(val_fraction * len(members)))
        val_idx.append(members[:count])
        train_idx.append(members[count:])
    # Membership is drawn above; these two permutations only order it.
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(val_idx))


def load(dataset: str, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
         image_size: int | None = None, normalization: str = "dataset") -> Splits:
    """Loads `dataset` ("cifar10", "cifar100" or an image-folder path) into `Splits`, with
    the `normalization` ("dataset" or "pixel_grid", see the module docstring)."""
    if normalization not in NORMALIZATIONS:
        raise DataError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if dataset in TFDS_NAMES:
        x, y, x_test, y_test, names = load_tfds(dataset, data_dir, image_size)
    elif os.sep in dataset or os.path.isdir(dataset):
        x, y, x_test, y_test, names = load_folder(dataset, image_size)
    else:
        raise DataError(f"unknown dataset {dataset!r}: use one of {TFDS_NAMES} or a folder path")
    train_idx, val_idx = stratified_split(y, val_fraction, seed)
    x_train = x[train_idx]
    mean = x_train.reshape(-1, x.shape[-1]).mean(axis=0)
    std = x_train.reshape(-1, x.shape[-1]).std(axis=0) + 1e-6
    splits = Splits(x_train, y[train_idx], x[val_idx], y[val_idx], x_test, y_test, names,
                    mean.astype(np.float32), std.astype(np.float32), "dataset",
                    mean.astype(np.float32), std.astype(np.float32))
    return with_normalization(splits, normalization)


def with_normalization(splits: Splits, normalization: str) -> Splits:
    """`splits` whose pipelines normalize with `normalization` (same images)."""
    if normalization == "dataset":
        mean, std = splits.dataset_mean, splits.dataset_std
    elif normalization == "pixel_grid":
        channels = splits.x_train.shape[-1]
        mean, std = (np.full(channels, v, np.float32) for v in PIXEL_GRID)
    else:
        raise DataError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return dataclasses.replace(splits, mean=mean, std=std, normalization=normalization)


def normalize(images, mean, std):
    """uint8 images -> float32, per-channel standardized."""
    return (tf.cast(images, tf.float32) - mean) / std


def augment(image, pad: int = 4):
    """CIFAR augmentation: pad by `pad` pixels (reflect), random crop back, random flip."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    image = tf.image.random_crop(padded, shape)
    return tf.image.random_flip_left_right(image)


def pipeline(x: np.ndarray, y: np.ndarray, splits: Splits, batch_size: int,
             training: bool, seed: int = 0) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of `(normalized image, label)`.

    Training: shuffled every epoch, augmented, full batches only (a partial last batch would
    retrace the train step). Evaluation: in order, every example.
    """
    mean, std = tf.constant(splits.mean), tf.constant(splits.std)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        data = data.map(lambda im, label: (normalize(augment(im), mean, std), label),
                        num_parallel_calls=tf.data.AUTOTUNE)
        data = data.batch(batch_size, drop_remainder=True)
    else:
        data = data.batch(batch_size).map(lambda im, label: (normalize(im, mean, std), label),
                                          num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)
