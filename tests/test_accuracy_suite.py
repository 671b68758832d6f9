"""The accuracy suite (``python -m benchmarks.accuracy``) end to end on a tiny BERT and the real GLUE files."""

import dataclasses
import json

import numpy as np
import pytest

from benchmarks import accuracy
from benchmarks.accuracy import GLUE_DIR

RECORD_KEYS = {
    "key": str,
    "task": str,
    "method": str,
    "split": str,
    "seed": int,
    "learning_rate": float,
    "head_learning_rate": float,
    "steps": int,
    "metrics": dict,
    "train_seconds": float,
    "trainable_params": int,
}


def small_grid(json_path, model, *extra):
    return [
        "--json",
        str(json_path),
        "--model",
        str(model),
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--max-train-samples",
        "80",
        *extra,
    ]


@pytest.fixture(scope="module")
def default_grid(tmp_path_factory, tiny_model):
    """Two tasks (a classification and a regression) x two methods x two seeds at the default rates."""
    path = tmp_path_factory.mktemp("accuracy") / "grid.json"
    argv = small_grid(path, tiny_model, "--tasks", "sst2,stsb", "--methods", "cdvft,head", "--seeds", "0,1")
    return argv, accuracy.main(argv), path


def test_one_record_per_run_with_every_dev_metric(default_grid):
    _, data, path = default_grid
    runs = data["runs"]
    assert json.loads(path.read_text())["runs"] == runs
    assert sorted((r["task"], r["method"], r["seed"]) for r in runs) == sorted(
        (t, m, s) for t in ("sst2", "stsb") for m in ("cdvft", "head") for s in (0, 1)
    )
    for r in runs:
        for key, kind in RECORD_KEYS.items():
            assert isinstance(r[key], kind), (key, r)
        # 80 examples make 10 batches of 8: the 12 steps span two epochs, each evaluated.
        assert r["split"] == "dev" and r["steps"] == 12 and [e["step"] for e in r["evaluations"]] == [0, 10, 12]
        expected = {"accuracy"} if r["task"] == "sst2" else {"pearson", "spearmanr"}
        assert set(r["metrics"]) == expected
        # The reported metrics are the final evaluation's, not the best epoch's.
        assert r["metrics"] == {m: r["evaluations"][-1][m] for m in expected}
        # The key names the layers an adapter method adapted (CDVFT's default: every linear layer), so
        # runs recorded before a method's default layers change are not taken for runs after it.
        layers = {"target_modules": ["all-linear"]} if r["method"] == "cdvft" else {}
        assert r["overrides"] == layers and ("target_modules=" in r["key"]) == (r["method"] == "cdvft")
    rates = {(r["method"], r["learning_rate"], r["head_learning_rate"]) for r in runs}
    lr, head_lr = accuracy.default_rates("cdvft")
    assert ("cdvft", lr, head_lr) in rates
    # Seeds change the run: another head init and another data order.
    by_seed = {r["seed"]: r["final_train_loss"] for r in runs if r["task"] == "sst2" and r["method"] == "cdvft"}
    assert by_seed[0] != by_seed[1]


def test_each_adapter_run_names_its_layers_and_an_override_replaces_the_default():
    assert accuracy.run_overrides("lora", {}) == (("target_modules", ("query", "value")),)
    assert accuracy.run_overrides("cdvft", {"weight_decay": 0.1}) == (
        ("target_modules", ("all-linear",)),
        ("weight_decay", 0.1),
    )
    assert accuracy.run_overrides("cdvft", {"target_modules": ("query",)}) == (("target_modules", ("query",)),)
    assert accuracy.run_overrides("full", {}) == ()


def test_tables_and_plot_are_written(default_grid):
    _, _, path = default_grid
    table = path.with_suffix(".md").read_text()
    assert "| cdvft |" in table and "| head |" in table and "sst2 (accuracy)" in table and "stsb (pearson)" in table
    assert "+-" in table and "(n=2)" in table
    assert "cdvft - head" in table
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_task_shows_every_methods_dev_curve_averaged_over_seeds(default_grid):
    _, data, path = default_grid
    table = path.with_suffix(".md").read_text()
    for task, metric in (("sst2", "accuracy"), ("stsb", "pearson")):
        assert f"{task}: dev {metric} x 100 at each evaluated step" in table
        for method in ("cdvft", "head"):
            runs = [r for r in data["runs"] if r["task"] == task and r["method"] == method]
            steps = [e["step"] for e in runs[0]["evaluations"]]
            assert all([e["step"] for e in r["evaluations"]] == steps for r in runs)
            # An undefined correlation (constant predictions) counts as 0, as in the score table.
            values = np.nan_to_num(
                [[np.nan if e[metric] is None else e[metric] for e in r["evaluations"]] for r in runs]
            )
            curve = values.mean(axis=0)
            expected = ", ".join(f"{step}: {100 * v:.1f}" for step, v in zip(steps, curve, strict=True))
            assert f"| {method} | {expected} |" in table


def _record(seed, evaluations):
    return {"main_metric": "pearson", "seed": seed, "evaluations": [{"step": k, "pearson": v} for k, v in evaluations]}


def test_dev_curves_average_the_steps_every_seed_evaluated_and_count_undefined_values_as_zero():
    records = {
        ("stsb", "cdvft"): [_record(0, [(0, None), (5, 0.2), (9, 0.6)]), _record(1, [(0, 0.1), (9, 0.8), (12, 0.9)])],
        ("stsb", "head"): [_record(0, [(0, float("nan")), (9, 0.3)])],
        ("stsb", "lora"): [_record(0, [(3, 0.5)]), _record(1, [(4, 0.5)])],  # no step in common: no curve
        ("stsb", "full"): [],
    }
    curves = accuracy.dev_curves(records)
    assert curves.keys() == {("stsb", "cdvft"), ("stsb", "head")}
    for key, expected in ((("stsb", "cdvft"), [(0, 0.05), (9, 0.7)]), (("stsb", "head"), [(0, 0.0), (9, 0.3)])):
        assert [step for step, _ in curves[key]] == [step for step, _ in expected]
        assert [value for _, value in curves[key]] == pytest.approx([value for _, value in expected])


def test_a_tasks_step_budget_can_change_without_locking_its_records(default_grid, monkeypatch):
    argv, data, _ = default_grid
    sst2 = accuracy.TASKS["sst2"]
    monkeypatch.setitem(accuracy.TASKS, "sst2", dataclasses.replace(sst2, steps=sst2.steps + 1))
    assert accuracy.main([*argv, "--report-only"])["runs"] == data["runs"]  # runs are keyed by their steps
    monkeypatch.setitem(accuracy.TASKS, "sst2", dataclasses.replace(sst2, max_length=sst2.max_length + 1))
    with pytest.raises(SystemExit, match=r"another setup.*tasks"):  # the data changed: another grid
        accuracy.main([*argv, "--report-only"])


def test_a_rerun_skips_every_recorded_run(default_grid, monkeypatch):
    argv, data, _ = default_grid

    def must_not_train(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(accuracy, "run_one", must_not_train)
    again = accuracy.main(argv)
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in data["runs"]]
    # An invocation of a part of the grid (one task, one method, one seed) still reports every recorded run,
    # each with all of its seeds.
    _, _, path = default_grid
    part = [*argv[: argv.index("--tasks")], "--tasks", "stsb", "--methods", "head", "--seeds", "0"]
    accuracy.main(part)
    table = path.with_suffix(".md").read_text()
    assert "sst2 (accuracy)" in table and "| cdvft |" in table
    assert "(n=1)" not in table and table.count("(n=2)") == 4


def test_sweep_chooses_the_rate_on_validation_and_reports_it_on_dev(tmp_path, tiny_model):
    path = tmp_path / "sweep.json"
    argv = ["--tasks", "sst2", "--methods", "cdvft", "--seeds", "0,1", "--sweep", "--lr-factors", "0.5,2"]
    runs = accuracy.main(small_grid(path, tiny_model, *argv))["runs"]
    trials = [r for r in runs if r["split"] == "validation"]
    reported = [r for r in runs if r["split"] == "dev"]
    assert len(trials) == 2 and len(reported) == 2
    default_lr, _ = accuracy.default_rates("cdvft")
    assert sorted(r["learning_rate"] for r in trials) == pytest.approx([default_lr * 0.5, default_lr * 2])
    train, _, _ = accuracy.text.load_data(
        accuracy.text.TextConfig(task="sst2", data_dir=GLUE_DIR / "SST-2", max_train_samples=80)
    )
    rest, validation = accuracy.carve_validation(train)
    assert all(r["train_examples"] == len(rest) and r["scored_examples"] == len(validation) for r in trials)
    assert all(r["train_examples"] == len(train) for r in reported)
    best = max(trials, key=accuracy.score)
    if accuracy.score(trials[0]) == accuracy.score(trials[1]):
        best = min(trials, key=lambda r: abs(r["learning_rate"] - default_lr))
    assert {r["learning_rate"] for r in reported} == {best["learning_rate"]}
    assert {r["seed"] for r in reported} == {0, 1}
    table = path.with_suffix(".md").read_text()
    assert "Chosen rates" in table
    # A later invocation about another task still reports this sweep: its trials, its choice, its dev runs.
    accuracy.main(small_grid(path, tiny_model, "--tasks", "stsb", "--methods", "cdvft", "--sweep", "--report-only"))
    again = path.with_suffix(".md").read_text()
    trials_row = next(line for line in table.splitlines() if line.startswith("| sst2 | cdvft |"))
    assert trials_row in again.splitlines()
    chosen_rate = f"| cdvft | {best['learning_rate']:.3g} |"
    assert chosen_rate in table and chosen_rate in again and "(n=2)" in again


def test_validation_is_carved_out_of_the_training_file_deterministically():
    examples = [accuracy.Example(f"sentence {i % 15_000}", None, i % 2) for i in range(20_000)]
    rest, validation = accuracy.carve_validation(examples)
    assert len(rest) + len(validation) == 20_000 and set(rest).isdisjoint(validation)
    # 1,000 distinct texts (the cap), with every copy of a held-out text on the validation side.
    held_texts = {examples[i].text_a for i in validation}
    assert len(held_texts) == accuracy.VALIDATION_MAX
    assert held_texts.isdisjoint(examples[i].text_a for i in rest)
    assert accuracy.carve_validation(examples) == (rest, validation)
    with pytest.raises(ValueError, match="cannot carve"):
        accuracy.carve_validation(examples[:1])


def test_the_sweep_follows_validation_even_when_dev_disagrees(tmp_path, tiny_model, monkeypatch):
    """Scripted scores: validation prefers 2x the default rate, dev would prefer 0.5x; 2x is reported."""
    default_lr, _ = accuracy.default_rates("cdvft")

    def scripted(spec, data, budget, model_path, batch_size):
        factor = round(spec.learning_rate / default_lr, 3)
        value = {"validation": {0.5: 0.6, 2.0: 0.7}, "dev": {0.5: 0.9, 2.0: 0.8}}[spec.split][factor]
        return {
            "key": spec.key,
            "task": spec.task,
            "method": spec.method,
            "split": spec.split,
            "seed": spec.seed,
            "learning_rate": spec.learning_rate,
            "main_metric": "accuracy",
            "metrics": {"accuracy": value + spec.seed / 100},
            "evaluations": [{"step": 0, "accuracy": 0.5}, {"step": spec.steps, "accuracy": value + spec.seed / 100}],
            "trainable_params": 1,
        }

    monkeypatch.setattr(accuracy, "run_one", scripted)
    argv = ["--tasks", "sst2", "--methods", "cdvft", "--seeds", "0,1", "--sweep", "--lr-factors", "0.5,2"]
    runs = accuracy.main(small_grid(tmp_path / "s.json", tiny_model, *argv))["runs"]
    reported = [r for r in runs if r["split"] == "dev"]
    assert [r["learning_rate"] for r in reported] == pytest.approx([2 * default_lr] * 2)
    table = (tmp_path / "s.md").read_text()
    assert "| cdvft | 80.5 +- 0.7 (n=2) |" in table  # dev at the chosen rate, seeds 0 and 1
    assert f"| sst2 | cdvft | {default_lr / 2:.3g}: 60.0, {default_lr * 2:.3g}: 70.0 |" in table


def test_resuming_with_another_setup_is_refused(default_grid):
    argv, _, _ = default_grid
    with pytest.raises(SystemExit, match=r"another setup.*batch_size"):
        accuracy.main([*argv, "--batch-size", "4"])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seeds", "0,0", "distinct ints"),
        ("--seeds", "-1", ">= 0"),
        ("--lr-factors", "1,0", "> 0"),
        ("--head-learning-rate", "nan", "> 0"),
        ("--alpha", "-1", "> 0"),
        ("--override", "max_steps=3", "FIELD one of"),
        ("--override", "rank=4", "FIELD one of"),
        ("--override", "target_modules=query", "not JSON"),
        ("--override", 'head_modules="pooler"', "JSON list of strings"),
        ("--override", "weight_decay=true", "finite number"),
    ],
)
def test_bad_flags_are_refused_with_a_message(flag, value, message, capsys, tiny_model):
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--json", "x.json", "--model", str(tiny_model), flag, value])
    assert message in capsys.readouterr().err
