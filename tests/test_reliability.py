"""The programs never mix two runs, never resume a different one, and stop on bad input or NaN with a name.

Every test here failed before its fix: a used ``--output-dir`` was silently reused, ``--resume`` took any
settings, a torn log line crashed ``--resume`` with a bare ``JSONDecodeError``, NaN training ran on and was
saved, and out-of-range flags were accepted.
"""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import cdvft_jax
from cdvft_jax.checkpoint import TrainingCheckpointer
from train import image, loop, text


@pytest.fixture
def csv_task(tmp_path) -> list[str]:
    """Flags of a small two-class custom task (48 train rows, 16 dev rows)."""
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = ["text,label"] + [f"{words[i % 6]} movie number {i},{'pos' if i % 6 < 3 else 'neg'}" for i in range(64)]
    (tmp_path / "train.csv").write_text("\n".join(rows[:49]) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join([rows[0], *rows[49:]]) + "\n")
    return [
        *("--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--eval-file", str(tmp_path / "dev.csv")),
        *("--batch-size", "8", "--epochs", "2", "--max-length", "16"),
    ]


def run_text(tiny_model: Path, out: Path, *args: str) -> dict:
    text.main(["--model", str(tiny_model), "--output-dir", str(out), *args])
    return json.loads((out / "results.json").read_text())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(out: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(out / "adapter" / "adapter_model.safetensors")


def test_a_fresh_run_refuses_a_used_folder_and_overwrite_replaces_the_run(tmp_path, tiny_model, csv_task):
    out = tmp_path / "out"
    run_text(tiny_model, out, *csv_task, "--checkpoint-every", "3", "--seed", "1")
    with pytest.raises(SystemExit, match=r"already holds a run \(run.json, metrics.jsonl, results.json, checkp"):
        run_text(tiny_model, out, *csv_task, "--checkpoint-every", "3")
    (out / "keep.txt").write_text("not the run's")
    run_text(tiny_model, out, *csv_task, "--checkpoint-every", "4", "--overwrite")
    # Only the new run's checkpoints (every 4 of 12 steps) are left, and its log describes it alone.
    steps = sorted(int(p.name) for p in (out / "checkpoints" / "cdvft").iterdir() if p.name.isdigit())
    assert steps == [4, 8, 12]
    assert [r["step"] for r in records(out)] == [0, 6, 12]
    assert json.loads((out / "run.json").read_text())["seed"] == 0
    assert (out / "keep.txt").read_text() == "not the run's"  # only the run's own files are replaced
    # The new run is the one a fresh folder gives (seed 0 here, seed 1 before).
    fresh = run_text(tiny_model, tmp_path / "fresh", *csv_task, "--checkpoint-every", "4")
    for key, value in adapter_tensors(tmp_path / "fresh").items():
        np.testing.assert_array_equal(adapter_tensors(out)[key], value, err_msg=key)
    assert fresh["best"] == json.loads((out / "results.json").read_text())["best"]


def test_resume_with_other_settings_names_every_field_that_differs(tmp_path, tiny_model, csv_task):
    out = tmp_path / "out"
    run_text(tiny_model, out, *csv_task, "--max-steps", "6", "--checkpoint-every", "3")
    with pytest.raises(SystemExit) as caught:
        run_text(tiny_model, out, *csv_task, "--max-steps", "6", "--seed", "2", "--learning-rate", "0.01", "--resume")
    message = str(caught.value)
    assert "2 differ" in message
    assert "learning_rate: 0.005 in the run, 0.01 now" in message and "seed: 0 in the run, 2 now" in message
    # The data may move: the same content at another path resumes (and finishes) the run.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("train.csv", "dev.csv"):
        (moved / name).write_bytes((tmp_path / name).read_bytes())
    moved_flags = [str(moved / Path(f).name) if f.endswith(".csv") else f for f in csv_task]
    run_text(tiny_model, out, *moved_flags, "--max-steps", "6", "--resume")
    assert [r["step"] for r in records(out)] == [0, 6]
    # A different training file is a different run too, though every flag is the same.
    (tmp_path / "train.csv").write_text((tmp_path / "train.csv").read_text().replace("good", "nice"))
    with pytest.raises(SystemExit, match="1 differ:\n  train_data: "):
        run_text(tiny_model, out, *csv_task, "--max-steps", "6", "--resume")


def test_resume_drops_a_torn_last_log_line_and_refuses_a_damaged_one(tmp_path, tiny_model, csv_task, capsys):
    straight = tmp_path / "straight"
    run_text(tiny_model, straight, *csv_task, "--checkpoint-every", "2")
    out = tmp_path / "out"
    run_text(tiny_model, out, *csv_task, "--checkpoint-every", "2")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"method": "cdvft", "step": 1')  # a kill in the middle of a write
    # A different --checkpoint-every does not change the run, so resuming with it is allowed.
    resumed = run_text(tiny_model, out, *csv_task, "--checkpoint-every", "5", "--resume")
    assert "dropping a torn last line" in capsys.readouterr().out
    assert records(out) == records(straight)
    assert resumed["best"] == json.loads((straight / "results.json").read_text())["best"]

    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a JSON record"):
        run_text(tiny_model, out, *csv_task, "--checkpoint-every", "2", "--resume")


def test_non_finite_training_stops_at_the_step_and_saves_nothing_of_it(tmp_path, tiny_model, csv_task):
    out = tmp_path / "out"
    with pytest.raises(loop.NonFiniteTraining) as caught:
        run_text(tiny_model, out, *csv_task, "--learning-rate", "1e38", "--checkpoint-every", "1")
    bad_step = int(re.match(r"step (\d+): the loss \((nan|inf|-inf)\) or the updated", str(caught.value)).group(1))
    assert bad_step > 1  # the first step is finite: the huge update only breaks the next forward pass
    steps = sorted(int(p.name) for p in (out / "checkpoints" / "cdvft").iterdir() if p.name.isdigit())
    assert steps and max(steps) < bad_step
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    # The last checkpoint is a good state to go back to.
    settings = loop.TrainSettings(learning_rate=1e38)
    setup = loop.setup_method("cdvft", _tiny_classifier(tiny_model), settings, total_steps=12)
    template = cdvft_jax.init_train_state(setup.trainable, setup.optimizer)
    with TrainingCheckpointer(out / "checkpoints" / "cdvft", save_every=1) as checkpointer:
        state, _, _ = checkpointer.restore_latest(template, jax.random.key(0))
    assert int(state.step) == max(steps)
    assert cdvft_jax.non_finite_leaves(state.trainable) == []


def _tiny_classifier(tiny_model: Path):
    from transformers import FlaxAutoModelForSequenceClassification

    return FlaxAutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be a positive int, got 0"),
        (["--batch-size", "-4"], "--batch-size must be a positive int, got -4"),
        (["--max-train-samples", "-1"], "--max-train-samples must be a positive int, got -1"),
        (["--max-eval-samples", "0"], "--max-eval-samples must be a positive int, got 0"),
        (["--max-steps", "0"], "--max-steps must be a positive int, got 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be a positive int, got 0"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be a finite number in [0, 1), got 1.0"),
        (["--warmup-ratio", "-0.1"], "--warmup-ratio must be a finite number in [0, 1), got -0.1"),
        (["--learning-rate", "0"], "--learning-rate must be a finite number > 0, got 0.0"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
        (["--head-learning-rate", "-0.001"], "--head-learning-rate must be a finite number > 0, got -0.001"),
        (["--alpha", "inf"], "--alpha must be a finite number, got inf"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
        (["--seed", "-1"], "--seed must be an int >= 0, got -1"),
        (["--rank", "0", "--method", "lora"], "--rank must be a positive int, got 0"),
        (["--resume", "--overwrite"], "give one"),
        (["--max-length", "1"], "--max-length must be an int >= 2"),
        (["--rank", "8"], "--rank does not apply to --method cdvft"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        text.parse_args(flags)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_image_flags_and_folders_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        image.parse_args(["--model", "m", "--eval-fraction", "1.5"])
    assert "--eval-fraction must be a number in (0, 1), got 1.5" in capsys.readouterr().err
    (tmp_path / "train" / "red").mkdir(parents=True)
    (tmp_path / "train" / "blue").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / "train" / "red" / "a.png")
    with pytest.raises(image.DataError, match=r"train/blue: class folder without images"):
        image.read_image_folder(tmp_path / "train")


def test_a_max_length_or_tokenizer_the_model_cannot_embed_is_refused(tiny_model):
    from transformers import AutoConfig, AutoTokenizer, RobertaConfig

    config, tokenizer = AutoConfig.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    text.check_model_fits(config, tokenizer, config.max_position_embeddings)  # fits exactly
    with pytest.raises(SystemExit, match="--max-length 129 is more than the model embeds: 128 position"):
        text.check_model_fits(config, tokenizer, 129)
    roberta = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514, pad_token_id=1)
    with pytest.raises(SystemExit, match=r"514 position embeddings, of which 2 sit before .* --max-length 512 or"):
        text.check_model_fits(roberta, tokenizer, 513)
    text.check_model_fits(roberta, tokenizer, 512)
    small = RobertaConfig(vocab_size=1000, max_position_embeddings=514, pad_token_id=1)
    with pytest.raises(SystemExit, match="the tokenizer has 30,522 tokens but the model embeds only 1,000"):
        text.check_model_fits(small, tokenizer, 64)
    tokenizer.pad_token = None
    with pytest.raises(SystemExit, match="the tokenizer has no pad token"):
        text.check_model_fits(config, tokenizer, 64)


def test_a_run_that_stopped_before_any_progress_does_not_block_the_folder(tmp_path, tiny_model, csv_task):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"seed": 7}')  # e.g. a run whose data failed to load after this was written
    (out / "metrics.jsonl").write_text('{"method": "cdvft", "step": 0, "epoch": 0, "train_loss": null}\n')
    run_text(tiny_model, out, *csv_task, "--max-steps", "2")
    assert json.loads((out / "run.json").read_text())["seed"] == 0
    assert [r["step"] for r in records(out)] == [0, 2]


def test_a_damaged_run_record_is_named(tmp_path, tiny_model, csv_task):
    out = tmp_path / "out"
    run_text(tiny_model, out, *csv_task, "--max-steps", "2")
    (out / "run.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"--resume: .*run.json is damaged"):
        run_text(tiny_model, out, *csv_task, "--max-steps", "2", "--resume")


def test_image_normalisation_comes_from_the_models_preprocessor_config_as_hugging_face_applies_it(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    assert [s.tolist() for s in image.normalisation(str(tmp_path))] == [[0.5] * 3, [0.5] * 3]  # no file: ViT's
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ViTImageProcessor(image_mean=mean, image_std=std).save_pretrained(tmp_path)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    ours = image.to_pixels([picture], *image.normalisation(str(tmp_path)))
    theirs = ViTImageProcessor.from_pretrained(tmp_path)(picture, do_resize=False, return_tensors="np").pixel_values
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_mean": [0.5, 0.5], "image_std": [0.5] * 3}, "image_mean must be 3 finite numbers"),
        ({"image_mean": [0.5] * 3, "image_std": [0.5, 0.0, 0.5]}, "image_std must be 3 finite numbers > 0"),
        ({"image_std": [0.5] * 3}, "image_mean must be 3 finite numbers"),
        ({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1.0}, "rescales pixels by 1.0"),
    ],
)
def test_a_preprocessor_config_that_train_image_cannot_follow_is_named(tmp_path, fields, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(fields))
    with pytest.raises(SystemExit, match=re.escape(message)):
        image.normalisation(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"preprocessor_config\.json is not JSON"):
        image.normalisation(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert [s.tolist() for s in image.normalisation(str(tmp_path))] == [[0.0] * 3, [1.0] * 3]
