"""``python -m train.image`` on a tiny random ViT: digits, a generated image folder, bad data, transforms."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CDVFT_BLOCK, interrupt_train_step_at
from PIL import Image

from train import image
from train.data import DataError


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A tiny random ViT encoder (no head) saved as a local folder; no pretrained ViT can be fetched here."""
    from transformers import FlaxViTModel, ViTConfig

    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    FlaxViTModel(config, seed=0).save_pretrained(folder)
    return folder


def run(tmp_path: Path, model: Path, *args: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    image.main(["--model", str(model), "--output-dir", str(out), "--batch-size", "16", *args])
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return results, records


def test_digits_run_writes_what_it_claims(tmp_path, tiny_vit):
    results, records = run(
        tmp_path,
        tiny_vit,
        "--dataset",
        "digits",
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "32",
        "--epochs",
        "2",
    )
    assert results["task"] == "digits" and results["method"] == "cdvft"
    # CDVFT's default layers (every linear layer of the 2 blocks; a ViT classifier has no pooler) + the
    # 10-class head.
    assert results["trainable_params"] == 2 * TINY_CDVFT_BLOCK + 32 * 10 + 10
    assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (4, 1), (8, 2)]
    assert float(results["best"]["accuracy"] * 32).is_integer()


def write_folder(root: Path, colours: dict[str, tuple[int, int, int]], count: int) -> None:
    rng = np.random.default_rng(0)
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            noise = rng.integers(-20, 20, (12, 20, 3))
            pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")


def test_image_folder_with_head_only(tmp_path, tiny_vit):
    write_folder(tmp_path / "train", {"red": (200, 30, 30), "blue": (30, 30, 200)}, 16)
    write_folder(tmp_path / "eval", {"red": (200, 30, 30), "blue": (30, 30, 200)}, 4)
    results, records = run(
        tmp_path,
        tiny_vit,
        "--image-dir",
        str(tmp_path / "train"),
        "--eval-dir",
        str(tmp_path / "eval"),
        "--method",
        "head",
        "--epochs",
        "2",
    )
    assert results["trainable_params"] == 32 * 2 + 2
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert float(results["best"]["accuracy"] * 8).is_integer()  # 8 eval images, every one scored


def test_bad_image_folders_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        image.read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        image.read_image_folder(tmp_path / "empty")
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        image.read_image_folder(tmp_path / "bad")
    write_folder(tmp_path / "other", {"dog": (0, 0, 0)}, 1)
    with pytest.raises(DataError, match=r"classes \['dog'\] are not among the training classes \['cat'\]"):
        image.read_image_folder(tmp_path / "other", ["cat"])


def test_transforms_give_the_model_size_and_are_reproducible():
    picture = Image.fromarray(np.arange(20 * 10 * 3, dtype=np.uint8).reshape(10, 20, 3))
    crop = image.random_resized_crop(picture, 8, np.random.default_rng(1))
    again = image.random_resized_crop(picture, 8, np.random.default_rng(1))
    assert crop.size == (8, 8) and np.array_equal(np.asarray(crop), np.asarray(again))
    center = image.center_crop(picture, 8)
    assert center.size == (8, 8)
    pixels = image.to_pixels([center], np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32))
    assert pixels.shape == (1, 3, 8, 8) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0, :, 0, 0], (np.asarray(center)[0, 0] / 255.0 - 0.5) / 0.5, rtol=1e-6)


def test_resume_after_an_interruption_is_bitwise_the_straight_run(tmp_path, tiny_vit, monkeypatch, capsys):
    """Random crops and flips come from (seed, epoch) and the skipped batches are still drawn, so a resumed
    run sees the same augmented images and ends on the same bits."""
    import safetensors.numpy

    flags = ("--dataset", "digits", "--max-train-samples", "64", "--max-eval-samples", "32")
    flags += ("--epochs", "2", "--checkpoint-every", "3")
    straight, straight_records = run(tmp_path / "straight", tiny_vit, *flags)
    interrupt_train_step_at(monkeypatch, 5)  # the last checkpoint is step 3, in the first epoch
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", tiny_vit, *flags)
    monkeypatch.undo()
    capsys.readouterr()
    resumed, resumed_records = run(tmp_path / "resumed", tiny_vit, *flags, "--resume")
    assert "resumed from step 3" in capsys.readouterr().out
    assert resumed_records == straight_records and resumed["best"] == straight["best"]
    tensors = [
        safetensors.numpy.load_file(tmp_path / name / "out" / "adapter" / "adapter_model.safetensors")
        for name in ("straight", "resumed")
    ]
    assert tensors[0].keys() == tensors[1].keys()
    for key, value in tensors[0].items():
        np.testing.assert_array_equal(tensors[1][key], value, err_msg=key)
