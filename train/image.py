"""Fine-tune a Flax Hugging Face ViT image classifier with CDVFT (or the head alone, or in full).

    python -m train.image --model google/vit-base-patch16-224-in21k --dataset cifar10   # online
    python -m train.image --model ./my-vit --image-dir ./flowers --eval-fraction 0.2      # local folder
    python -m train.image --model ./tiny-vit --dataset digits                            # offline smoke run

Data: a local folder with one sub-folder per class (``--image-dir``, and ``--eval-dir`` or a held-out
``--eval-fraction``), scikit-learn's 8x8 ``digits`` (offline), or a Hugging Face ``datasets`` image dataset
by name when the hub is reachable (``pip install datasets``).  Transforms follow the protocol: random
resized crop and horizontal flip for training; resize to ``image_size / 0.875`` and center crop for
evaluation; then the model's normalisation (its ``preprocessor_config.json``, else ViT's 0.5 / 0.5).
No pretrained ViT can be fetched on a machine without hub access; pass a local folder.
Outputs in ``--output-dir`` are those of ``train.text``: ``metrics.jsonl`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tyro
from PIL import Image

from train.data import DataError
from train.loop import (
    ConfigError,
    Evaluation,
    RunConfig,
    RunFiles,
    TrainData,
    TrainSettings,
    digest,
    mesh_from_flag,
    model_digest,
    parse_config,
    prepare_output,
    run_fingerprint,
    summary_table,
    tensorboard_folder,
    train_and_evaluate,
    write_results,
)
from train.methods import Batch
from train.metrics import compute_metrics

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EVAL_RESIZE_RATIO = 0.875  # resize to size / 0.875, then center-crop to size


class ImageSet(NamedTuple):
    """Images (PIL, RGB) with integer labels and the class names."""

    images: list[Image.Image]
    labels: np.ndarray
    class_names: list[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageConfig(RunConfig):
    """Everything one image run needs; built by :func:`parse_args`.

    The training and run fields come from :class:`~train.loop.RunConfig`; these are the image ones.

    Attributes:
      model: hub name or local folder of a ViT checkpoint.
      dataset: digits (offline) or a Hugging Face datasets name (online).
      image_dir: folder with one sub-folder of images per class.
      eval_dir: evaluation folder in the same layout.
      eval_fraction: held-out share when there is no eval_dir.
      epochs: passes over the training data.
      output_dir: where metrics.jsonl, results.json, the adapter and checkpoints go.
    """

    model: str
    dataset: str | None = None
    image_dir: Path | None = None
    eval_dir: Path | None = None
    eval_fraction: float = 0.2
    epochs: int = 10
    output_dir: Path = Path("outputs/image")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eval_fraction, bool) or not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be a number in (0, 1), got {self.eval_fraction!r}")


def read_image_folder(folder: Path, class_names: Sequence[str] | None = None) -> ImageSet:
    """Images from ``folder/<class>/<file>``; classes sorted by name unless ``class_names`` is given.

    Raises:
      DataError: naming the folder or file, for a missing folder, a folder without class sub-folders or
        images, a class not among ``class_names``, or a file that is not a readable image.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>)")
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{folder}: classes {unknown} are not among the training classes {names}")
    images, labels = [], []
    for name in found:
        before = len(images)
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not a readable image ({e})") from e
            labels.append(names.index(name))
        if len(images) == before:
            raise DataError(f"{folder / name}: class folder without images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    if not images:
        raise DataError(f"{folder}: no images with extensions {IMAGE_EXTENSIONS}")
    return ImageSet(images, np.asarray(labels, np.int32), names)


def digits() -> ImageSet:
    """scikit-learn's 1,797 8x8 handwritten digits as RGB images (offline)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = (data.images / 16.0 * 255.0).round().astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    return ImageSet(images, data.target.astype(np.int32), [str(d) for d in range(10)])


def hub_dataset(name: str) -> tuple[ImageSet, ImageSet]:
    """A Hugging Face ``datasets`` image dataset's train and test splits (needs the hub)."""
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(f"--dataset {name} needs the hub and `pip install datasets`") from e
    loaded = datasets.load_dataset(name)
    splits = []
    for split in ("train", "test" if "test" in loaded else "validation"):
        table = loaded[split]
        image_key = next(k for k in ("img", "image") if k in table.column_names)
        label_key = next(k for k in ("label", "fine_label", "labels") if k in table.column_names)
        names = table.features[label_key].names
        images = [im.convert("RGB") for im in table[image_key]]
        splits.append(ImageSet(images, np.asarray(table[label_key], np.int32), names))
    return splits[0], splits[1]


def split(data: ImageSet, eval_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A fixed random hold-out of ``eval_fraction`` of ``data``."""
    if not 0.0 < eval_fraction < 1.0:
        raise SystemExit(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(len(data.images))
    n_eval = max(1, round(eval_fraction * len(order)))
    pick = lambda idx: ImageSet([data.images[i] for i in idx], data.labels[idx], data.class_names)  # noqa: E731
    return pick(order[n_eval:]), pick(order[:n_eval])


def _subset(data: ImageSet, limit: int | None, seed: int) -> ImageSet:
    if limit is None or limit >= len(data.images):
        return data
    keep = np.sort(np.random.default_rng(seed).permutation(len(data.images))[:limit])
    return ImageSet([data.images[i] for i in keep], data.labels[keep], data.class_names)


def random_resized_crop(
    image: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """The Inception-style crop: a random area and aspect ratio, resized to ``size`` x ``size``."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return center_crop(image, size, 1.0)  # fall back to the whole image, as torchvision does


def center_crop(image: Image.Image, size: int, resize_ratio: float = EVAL_RESIZE_RATIO) -> Image.Image:
    """Resize the short side to ``size / resize_ratio``, then crop the central ``size`` x ``size``."""
    width, height = image.size
    short = round(size / resize_ratio)
    scale = short / min(width, height)
    resized = image.resize((max(short, round(width * scale)), max(short, round(height * scale))), Image.BILINEAR)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def to_pixels(images: Sequence[Image.Image], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(N, 3, H, W)`` float32, normalised: the layout Hugging Face's Flax ViT takes."""
    array = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
    return ((array - mean) / std).transpose(0, 3, 1, 2)


def batches(data: ImageSet, batch_size: int, size: int, mean, std, rng: np.random.Generator | None) -> Iterator[Batch]:
    """Training batches (shuffled, augmented, last partial batch dropped) when ``rng`` is given, else eval."""
    n = len(data.images)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if rng is not None else n
    for start in range(0, stop, batch_size):
        rows = order[start : start + batch_size]
        if rng is not None:
            crops = []
            for i in rows:
                crop = random_resized_crop(data.images[i], size, rng)
                crops.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
        else:
            crops = [center_crop(data.images[i], size) for i in rows]
        pixels = np.zeros((batch_size, 3, size, size), np.float32)
        pixels[: len(rows)] = to_pixels(crops, mean, std)
        labels = np.zeros((batch_size,), np.int32)
        labels[: len(rows)] = data.labels[rows]
        weights = np.zeros((batch_size,), np.float32)
        weights[: len(rows)] = 1.0
        yield Batch({"pixel_values": pixels}, labels, weights)


def normalisation(model_path: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel mean and std of the model's ``preprocessor_config.json``, else ViT's 0.5 / 0.5.

    Pixels are scaled to [0, 1] first (HF image processors' ``rescale_factor`` 1/255); a config with
    ``do_normalize: false`` gives mean 0 and std 1.

    Raises:
      SystemExit: naming the file, when it is not JSON, its mean or std are not three finite numbers
        (std > 0), or it rescales pixels other than by 1/255.
    """
    path = Path(model_path) / "preprocessor_config.json"
    if not path.is_file():
        return np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path} is not JSON: {e}") from e
    if not isinstance(values, dict):
        raise SystemExit(f"{path} is not a JSON object")
    factor = values.get("rescale_factor", 1 / 255) if values.get("do_rescale", True) else 1.0
    if not isinstance(factor, int | float) or not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise SystemExit(f"{path} rescales pixels by {factor!r}; train.image scales them by 1/255 only")
    if not values.get("do_normalize", True):
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    stats = []
    for key in ("image_mean", "image_std"):
        value = values.get(key)
        ok = isinstance(value, list) and len(value) == 3
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (key == "image_std" and min(value) <= 0):
            bound = " > 0" if key == "image_std" else ""
            raise SystemExit(f"{path}: {key} must be 3 finite numbers{bound} (one per RGB channel), got {value!r}")
        stats.append(np.asarray(value, np.float32))
    return stats[0], stats[1]


def images_digest(data: ImageSet) -> str:
    """A fingerprint of an image set: every image's pixels and size, the labels and the class names.

    The images are hashed one at a time, so no second copy of the set is ever held.
    """
    sha = hashlib.sha256()
    for image in data.images:
        sha.update(f"{image.size}{image.mode}".encode())
        sha.update(image.tobytes())
    sha.update(digest(data.labels, data.class_names).encode())
    return sha.hexdigest()


def load_data(config: ImageConfig) -> tuple[ImageSet, ImageSet]:
    """Train and eval image sets for ``config``."""
    if config.image_dir is not None:
        train = read_image_folder(config.image_dir)
        if config.eval_dir is not None:
            return train, read_image_folder(config.eval_dir, train.class_names)
        return split(train, config.eval_fraction, seed=0)
    if config.dataset == "digits":
        return split(digits(), config.eval_fraction, seed=0)
    if config.dataset:
        return hub_dataset(config.dataset)
    raise SystemExit("give --image-dir DIR or --dataset NAME (digits works offline)")


def run(config: ImageConfig) -> dict:
    """Runs the fine-tuning described by ``config``; writes and returns ``results.json``'s content."""
    from transformers import FlaxViTForImageClassification

    # First: a multi-process run joins its job before anything touches JAX (loading the model does).
    mesh = mesh_from_flag(
        config.mesh, coordinator=config.coordinator, num_processes=config.num_processes, process_id=config.process_id
    )
    train, dev = load_data(config)
    train = _subset(train, config.max_train_samples, config.seed)
    dev = _subset(dev, config.max_eval_samples, 0)
    num_labels = len(train.class_names)
    print(f"{len(train.images):,} train / {len(dev.images):,} eval images, {num_labels} classes, model {config.model}")
    model = FlaxViTForImageClassification.from_pretrained(config.model, num_labels=num_labels, seed=config.seed)
    size = model.config.image_size
    mean, std = normalisation(config.model)

    if len(train.images) < config.batch_size:
        raise SystemExit(f"{len(train.images)} training images do not fill one batch of {config.batch_size}")
    fingerprint = run_fingerprint(
        config, model=model_digest(config.model), train_data=images_digest(train), eval_data=images_digest(dev)
    )
    log = prepare_output(config.output_dir, resume=config.resume, overwrite=config.overwrite, fingerprint=fingerprint)
    settings = TrainSettings.from_config(config)
    evaluation = Evaluation(
        batches=lambda: batches(dev, config.batch_size, size, mean, std, rng=None),
        labels=dev.labels,
        metrics=lambda predictions, labels: compute_metrics(["accuracy"], predictions, labels),
        metric_names=("accuracy",),
        main_metric="accuracy",
    )
    events = tensorboard_folder(config.output_dir)
    # Augmentation and order depend on (seed, epoch) only, so runs are reproducible.
    data = TrainData(
        steps_per_epoch=len(train.images) // config.batch_size,
        batches=lambda epoch: batches(
            train, config.batch_size, size, mean, std, np.random.default_rng([config.seed, epoch])
        ),
        evaluation=evaluation,
        regression=False,
    )
    files = RunFiles(
        log_path=log,
        adapter_dir=config.output_dir / "adapter",
        checkpoint_dir=config.output_dir / "checkpoints" / config.method,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        tensorboard_dir=None if events is None else events / config.method,
    )
    run_result = train_and_evaluate(
        model, settings, data, files, description=f"{config.method} images", base_model=config.model, mesh=mesh
    )
    task = config.dataset or str(config.image_dir)
    results = write_results(
        config.output_dir,
        task=task,
        model=config.model,
        settings=settings,
        config=dataclasses.asdict(config),
        runs=[run_result],
    )
    print(summary_table(task, "accuracy", [run_result]))
    return results


def parse_args(argv: Sequence[str] | None = None) -> ImageConfig:
    """Command line -> :class:`ImageConfig` (``--model`` is required)."""
    return parse_config(
        ImageConfig, argv, prog="python -m train.image", description=__doc__.split("\n\n")[0], model=tyro.MISSING
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m train.image``."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
