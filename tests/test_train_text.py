"""End-to-end runs of ``python -m train.text`` on a tiny random BERT and real GLUE files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from conftest import TINY_BERT_CDVFT, interrupt_train_step_at, run_two_cpu_processes, tensorboard_scalars
from text_process import MARKER as WRITES_MARKER

import cdvft_jax
from train import text

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"the shared GLUE files are not at {GLUE}")


def run(tmp_path: Path, model: Path, *args: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    text.main(["--model", str(model), "--output-dir", str(out), "--batch-size", "16", *args])
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return results, records


@needs_glue
def test_sst2_run_writes_what_it_claims(tmp_path, tiny_model):
    results, records = run(
        tmp_path,
        tiny_model,
        *("--task", "sst2", "--data-dir", str(GLUE / "SST-2")),
        *("--max-train-samples", "64", "--max-eval-samples", "40", "--epochs", "2"),
    )
    assert results["task"] == "SST-2" and results["method"] == "cdvft" and results["seed"] == 0
    assert results["model"] == str(tiny_model)
    # CDVFT's default layers (every linear layer but the classifier) + the classifier (32 x 2 + 2).
    assert results["trainable_params"] == TINY_BERT_CDVFT + 32 * 2 + 2
    assert set(results["best"]) == {"accuracy"}
    assert results["train_seconds"] > 0 and results["steps_per_second"] > 0
    assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (4, 1), (8, 2)]
    assert records[0]["train_loss"] is None and all(r["train_loss"] > 0 for r in records[1:])
    best = max(records[1:], key=lambda r: r["accuracy"])
    assert results["best"]["accuracy"] == best["accuracy"] and results["best_epoch"] == best["epoch"]
    # Accuracy on 40 examples is a multiple of 1/40.
    assert float(results["best"]["accuracy"] * 40).is_integer()
    # TensorBoard shows what metrics.jsonl holds (as float32), and the running loss at the last step.
    scalars = tensorboard_scalars(tmp_path / "out" / "tensorboard" / "cdvft")
    assert scalars["dev/accuracy"] == [(r["step"], np.float32(r["accuracy"])) for r in records]
    assert scalars["train/epoch_loss"] == [(r["step"], np.float32(r["train_loss"])) for r in records[1:]]
    assert scalars["train/loss"] == [(8, np.float32(records[-1]["train_loss"]))]
    # The trained adapter is saved and loads back into a fresh base model.
    from transformers import FlaxBertForSequenceClassification

    adapter = tmp_path / "out" / "adapter"
    assert cdvft_jax.read_adapter_config(adapter)["base_model"] == str(tiny_model)
    fresh = FlaxBertForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    _, params = cdvft_jax.load_adapter(adapter, fresh)
    assert cdvft_jax.count_params(params) - cdvft_jax.count_params(fresh.params) == TINY_BERT_CDVFT


@needs_glue
def test_stsb_is_regression_with_pearson_and_spearman(tmp_path, tiny_model):
    results, _ = run(
        tmp_path,
        tiny_model,
        *("--task", "stsb", "--data-dir", str(GLUE / "STS-B")),
        *("--max-train-samples", "32", "--max-eval-samples", "32", "--epochs", "1"),
    )
    assert set(results["best"]) == {"pearson", "spearmanr"}
    for name, value in results["best"].items():  # constant predictions would give NaN
        assert np.isfinite(value) and -1.0 <= value <= 1.0, (name, value)
    assert results["trainable_params"] == TINY_BERT_CDVFT + 32 * 1 + 1


@pytest.mark.parametrize("method", ["head", "full"])
def test_other_methods_on_a_custom_csv(tmp_path, tiny_model, method):
    rows = ["text,label"] + [
        f"sample number {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(40)
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:17]) + "\n")
    results, records = run(
        tmp_path,
        tiny_model,
        *("--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--eval-file", str(tmp_path / "dev.csv")),
        *("--method", method, "--epochs", "1"),
    )
    assert results["method"] == method
    head = 32 * 2 + 2
    if method == "head":
        assert results["trainable_params"] == head
    else:  # every weight of the classifier: the tiny encoder's and the new head's
        from transformers import FlaxAutoModelForSequenceClassification

        everything = FlaxAutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).params
        assert results["trainable_params"] == cdvft_jax.count_params(everything)
    assert len(records) == 2


@needs_glue
def test_same_seed_gives_the_same_run(tmp_path, tiny_model):
    args = ("--task", "cola", "--data-dir", str(GLUE / "CoLA"), "--max-train-samples", "48", "--max-eval-samples", "32")
    first, first_records = run(tmp_path / "a", tiny_model, *args, "--epochs", "1")
    second, second_records = run(tmp_path / "b", tiny_model, *args, "--epochs", "1")
    assert first_records == second_records
    assert first["best"] == second["best"]


def test_bad_data_names_the_file_and_line(tmp_path, tiny_model):
    (tmp_path / "train.csv").write_text("text,label\nfine,a\n,b\n")
    (tmp_path / "dev.csv").write_text("text,label\nfine,a\n")
    with pytest.raises(ValueError, match=r"train\.csv.*line 3"):
        run(
            tmp_path,
            tiny_model,
            *(
                "--task",
                "custom",
                "--train-file",
                str(tmp_path / "train.csv"),
                "--eval-file",
                str(tmp_path / "dev.csv"),
            ),
        )


def test_batches_pad_to_a_multiple_of_16_and_keep_every_eval_example():
    data = text.Encoded([[5] * n for n in (3, 20, 7, 30, 2)], None, np.arange(5, dtype=np.int32))
    eval_batches = list(text.batches(data, 2, pad_id=0, max_length=32, rng=None))
    assert [b.inputs["input_ids"].shape for b in eval_batches] == [(2, 32), (2, 32), (2, 16)]
    assert [b.weights.tolist() for b in eval_batches] == [[1, 1], [1, 1], [1, 0]]
    assert eval_batches[0].inputs["attention_mask"][0].tolist() == [1] * 3 + [0] * 29
    train_batches = list(text.batches(data, 2, pad_id=0, max_length=64, rng=np.random.default_rng(0)))
    assert len(train_batches) == 2  # the last partial batch is dropped in training
    seen = np.concatenate([b.labels for b in train_batches])
    assert len(set(seen.tolist())) == 4


def test_presets_fill_unset_flags_and_flags_win():
    config = text.parse_args(["--task", "SST-2", "--epochs", "5"])
    assert config.task == "sst2" and config.epochs == 5 and config.max_length == text.PRESETS["sst2"].max_length
    quick = text.parse_args([])
    assert quick.task == "tweets" and quick.compare_head
    assert (quick.max_train_samples, quick.epochs, quick.batch_size) == (4800, 2, 32)  # 300 steps
    with pytest.raises(SystemExit, match="unknown --task"):
        text.parse_args(["--task", "nope"])


@needs_glue
def test_resume_after_an_interruption_ends_where_a_straight_run_ends(tmp_path, tiny_model, monkeypatch):
    args = (
        *("--task", "cola", "--data-dir", str(GLUE / "CoLA"), "--max-train-samples", "48"),
        *("--max-eval-samples", "32", "--epochs", "2", "--checkpoint-every", "2"),
    )
    straight, straight_records = run(tmp_path / "straight", tiny_model, *args)

    interrupt_train_step_at(monkeypatch, 4)  # after the checkpoint of step 4, in the second epoch
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", tiny_model, *args)
    monkeypatch.undo()
    resumed, resumed_records = run(tmp_path / "resumed", tiny_model, *args, "--resume")

    assert resumed_records == straight_records
    assert resumed["best"] == straight["best"]
    # TensorBoard hides what the cut-short run logged after its last checkpoint, so both show the same.
    tensorboard = [tmp_path / name / "out" / "tensorboard" / "cdvft" for name in ("straight", "resumed")]
    assert len(list(tensorboard[1].glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(tensorboard[1]) == tensorboard_scalars(tensorboard[0])
    assert [step for step, _ in tensorboard_scalars(tensorboard[0])["dev/matthews_correlation"]] == [0, 3, 6]
    saved = [
        safetensors.numpy.load_file(tmp_path / name / "out" / "adapter" / "adapter_model.safetensors")
        for name in ("straight", "resumed")
    ]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        np.testing.assert_array_equal(saved[1][key], saved[0][key], err_msg=key)


SHARDED_ARGS = (
    *("--batch-size", "16", "--task", "sst2", "--data-dir", str(GLUE / "SST-2")),
    *("--max-train-samples", "64", "--max-eval-samples", "32", "--epochs", "1"),
)
REPO = Path(__file__).resolve().parents[1]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, tiny_model) -> Path:
    """The output folder of ``--mesh data=2,fsdp=4`` on 8 CPU devices in one process.

    A subprocess: the device count is fixed when jax is imported.
    """
    if not GLUE.is_dir():
        pytest.skip(f"the shared GLUE files are not at {GLUE}")
    out = tmp_path_factory.mktemp("eight-devices") / "out"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    flags = ["--model", str(tiny_model), *SHARDED_ARGS, "--output-dir", str(out), "--mesh", "data=2,fsdp=4"]
    done = subprocess.run(
        [sys.executable, "-m", "train.text", *flags],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@needs_glue
def test_a_sharded_run_matches_the_single_device_run(tmp_path, tiny_model, eight_device_run):
    """``--mesh data=2,fsdp=4`` on 8 CPU devices ends where the run on one device ends."""
    text.main(["--model", str(tiny_model), *SHARDED_ARGS, "--output-dir", str(tmp_path / "single")])
    single, parallel = _records(tmp_path / "single"), _records(eight_device_run)
    assert [r["step"] for r in parallel] == [r["step"] for r in single]
    np.testing.assert_allclose(parallel[-1]["train_loss"], single[-1]["train_loss"], rtol=1e-5)
    weights = [_adapter(tmp_path / "single"), _adapter(eight_device_run)]
    for key in weights[0]:
        np.testing.assert_allclose(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6, err_msg=key)


def _two_processes(flags: list[str], hook: tuple[str, ...] = ()) -> list[tuple[int, str, list]]:
    """Runs ``train.text`` as 2 processes x 4 CPU devices (tests/text_process.py); their status, log, writes.

    The coordinator comes from ``JAX_COORDINATOR_ADDRESS``, the process count and index from the flags.
    """
    script = str(REPO / "tests" / "text_process.py")
    runs = run_two_cpu_processes(
        lambda i: [sys.executable, script, *hook, *flags, "--num-processes", "2", "--process-id", str(i)], REPO, 300
    )
    results = []
    for code, output in runs:
        marked = [line for line in output.splitlines() if line.startswith(WRITES_MARKER)]
        results.append((code, output, json.loads(marked[-1][len(WRITES_MARKER) :]) if marked else None))
    return results


def _assert_same_run(out: Path, reference: Path) -> None:
    records, expected = _records(out), _records(reference)
    # One line per evaluation: a second writer would repeat them.
    assert [(r["step"], r["epoch"]) for r in records] == [(r["step"], r["epoch"]) for r in expected]
    for got, want in zip(records, expected, strict=True):
        assert got["accuracy"] == want["accuracy"]
        if want["train_loss"] is not None:
            np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-6)
    results, reference_results = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert results["best"] == reference_results["best"]
    assert results["runs"][0]["steps"] == reference_results["runs"][0]["steps"]
    weights, reference_weights = _adapter(out), _adapter(reference)
    assert weights.keys() == reference_weights.keys()
    for key in weights:
        np.testing.assert_allclose(weights[key], reference_weights[key], rtol=1e-5, atol=1e-7, err_msg=key)


@needs_glue
def test_two_processes_match_one_process_through_an_interruption(tmp_path, tiny_model, eight_device_run):
    """2 processes x 4 CPU devices, interrupted after a checkpoint and resumed, end as 1 process x 8 devices.

    Each process places only its half of every batch; both take part in the Orbax saves and the restore;
    only process 0 writes the run's files.  (One test for both: every 2-process launch costs ~30 s here.)
    """
    out = tmp_path / "out"
    flags = ["--model", str(tiny_model), *SHARDED_ARGS, "--output-dir", str(out), "--mesh", "data=2,fsdp=4"]
    flags += ["--checkpoint-every", "2"]
    interrupted = _two_processes(flags, hook=("--stop-at", "2"))
    for code, log, _ in interrupted:
        assert code == 3, log[-3000:]  # text_process.py's status for an interrupted run
    steps = lambda: sorted(p.name for p in (out / "checkpoints" / "cdvft").iterdir() if p.name.isdigit())  # noqa: E731
    assert steps() == ["2"]
    assert [r["step"] for r in _records(out)] == [0]
    resumed = _two_processes([*flags, "--resume"])
    for code, log, _ in resumed:
        assert code == 0, log[-3000:]
        assert "resumed from step 2" in log
    assert [interrupted[1][2], resumed[1][2]] == [[], []], "process 1 wrote files of the run"
    _assert_same_run(out, eight_device_run)
    assert steps() == ["2", "4"]


def test_a_resumed_tensorboard_log_hides_what_the_cut_short_run_logged_after_its_checkpoint(tmp_path):
    from train.hooks import TensorBoardHook

    def record(step, accuracy):
        return {"method": "cdvft", "step": step, "epoch": step // 3, "train_loss": None, "accuracy": accuracy}

    cut_short = TensorBoardHook(tmp_path, ["accuracy"])
    for step, accuracy in ((0, 0.5), (3, 0.625), (6, 0.75)):  # 3 steps an epoch; killed after step 6's eval
        cut_short.on_evaluation(record(step, accuracy))
    cut_short.on_abort()
    # Restored from the checkpoint of step 3, an epoch end: its evaluation is kept (and not redone), step 6's
    # is hidden and done again.
    resumed = TensorBoardHook(tmp_path, ["accuracy"], resumed_from=3)
    resumed.on_evaluation(record(6, 0.875))
    resumed.on_finish(None)
    assert tensorboard_scalars(tmp_path)["dev/accuracy"] == [(0, 0.5), (3, 0.625), (6, 0.875)]
