"""``--method lora|vera|fourierft|c3a`` in the training programs: same loop, same files, the right sizes."""

import json
from pathlib import Path

import pytest
from conftest import make_model

import cdvft_jax
from train import image, text
from train.loop import ConfigError, TrainSettings, adapter_config, setup_method
from train.methods import DEFAULT_LEARNING_RATES

# The defaults as the README states them: CDVFT's measured rate, the papers' RoBERTa-base rates of the
# baselines, full fine-tuning's.  Written out, so a change to a default must change this line too.
DOCUMENTED_RATES = {"cdvft": 5e-3, "lora": 5e-4, "vera": 1e-2, "fourierft": 5e-2, "c3a": 1.0, "full": 2e-5}

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

# Tiny BERT: 2 layers x (query, value), 32 x 32; the head is 32 x 2 + 2.
ADAPTER_COUNTS = {
    "lora": ({"--rank": "4"}, 2 * 2 * 4 * (32 + 32)),
    "vera": ({"--rank": "16"}, 2 * 2 * (16 + 32)),
    "fourierft": ({"--n-frequency": "40"}, 2 * 2 * 40),
    "c3a": ({"--block-size": "8"}, 2 * 2 * 32 * 32 // 8),
}


@pytest.mark.skipif(not GLUE.is_dir(), reason=f"the shared GLUE files are not at {GLUE}")
@pytest.mark.parametrize("method", sorted(ADAPTER_COUNTS))
def test_a_baseline_run_trains_saves_and_loads_like_cdvft(method, tmp_path, tiny_model):
    sizes, adapter_count = ADAPTER_COUNTS[method]
    out = tmp_path / "out"
    text.main(
        [
            *("--model", str(tiny_model), "--output-dir", str(out), "--method", method),
            *("--task", "sst2", "--data-dir", str(GLUE / "SST-2"), "--batch-size", "16", "--epochs", "1"),
            *("--max-train-samples", "48", "--max-eval-samples", "32"),
            *[item for pair in sizes.items() for item in pair],
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method
    assert results["trainable_params"] == adapter_count + 32 * 2 + 2
    assert results["config"]["learning_rate"] == DOCUMENTED_RATES[method]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3] and records[1]["train_loss"] > 0

    from transformers import FlaxBertForSequenceClassification

    saved = cdvft_jax.read_adapter_config(out / "adapter")
    assert saved["adapter"]["method"] == method
    fresh = FlaxBertForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    adapted, params = cdvft_jax.load_adapter(out / "adapter", fresh)
    trainable, _ = adapted.split(params)
    assert cdvft_jax.count_params(trainable) == adapter_count + 32 * 2 + 2


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (dict(method="cdvft", rank=4), "--rank does not apply to --method cdvft"),
        (dict(method="lora", block_size=8), "--block-size does not apply to --method lora"),
        (dict(method="vera", n_frequency=8), "--n-frequency does not apply to --method vera"),
    ],
)
def test_sizes_of_another_method_are_refused(sizes, message):
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**sizes)


def test_bad_sizes_are_refused_before_any_method_is_built():
    with pytest.raises(ConfigError, match="--rank must be a positive int, got 0"):
        TrainSettings(method="lora", rank=0)
    with pytest.raises(ConfigError, match="unknown method 'dora'; choose from cdvft, lora"):
        TrainSettings(method="dora")


def test_method_defaults_and_flags_reach_the_configs():
    assert adapter_config("lora", TrainSettings()) == cdvft_jax.LoRAConfig(
        target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    config = adapter_config("vera", TrainSettings(method="vera", rank=64, alpha=2.0))
    assert (config.rank, config.alpha) == (64, 2.0)
    assert adapter_config("fourierft", TrainSettings(method="fourierft", n_frequency=10)).n_frequency == 10
    assert adapter_config("cdvft", TrainSettings(block_size=16)).block_size == 16
    # CDVFT adapts every linear layer by default; the baselines query and value, as their papers do.
    assert adapter_config("cdvft", TrainSettings()).target_modules == cdvft_jax.ALL_LINEAR
    assert adapter_config("c3a", TrainSettings(method="c3a")).target_modules == ("query", "value")
    named = adapter_config("cdvft", TrainSettings(target_modules=("query", "value")))
    assert named.target_modules == ("query", "value")
    c3a = adapter_config("c3a", TrainSettings(method="c3a", block_size=8))
    assert (type(c3a), c3a.block_size) == (cdvft_jax.C3AConfig, 8)
    # Each method gets its own default rate (the documented ones, in the README) unless a flag sets one.
    assert DEFAULT_LEARNING_RATES == DOCUMENTED_RATES
    for method, rate in DOCUMENTED_RATES.items():
        assert text.parse_args(["--method", method]).learning_rate == rate
    assert text.parse_args(["--method", "lora", "--learning-rate", "1e-3"]).learning_rate == 1e-3
    assert text.parse_args(["--method", "full", "--learning-rate", "1e-4"]).learning_rate == 1e-4
    assert image.parse_args(["--model", "m", "--method", "vera"]).learning_rate == 1e-2
    assert image.parse_args(["--model", "m"]).learning_rate == 5e-3


@pytest.mark.parametrize(("method", "prefix"), [("full", ""), ("lora", "lora_")])
def test_each_method_steps_at_its_own_learning_rate(method, prefix):
    """After the one warm-up step, an AdamW step on constant gradients moves each weight by the peak rate:
    the given one, else the method's default (``full`` honours ``--learning-rate`` too)."""
    import jax
    import numpy as np

    model = make_model("bert")

    def second_update(learning_rate):
        settings = TrainSettings(method=method, learning_rate=learning_rate, warmup_ratio=0.0)
        setup = setup_method(method, model, settings, total_steps=1000)
        grads = jax.tree.map(np.ones_like, setup.trainable)
        state = setup.optimizer.init(setup.trainable)
        for _ in range(2):  # the first step is the warm-up's, at rate 0
            updates, state = setup.optimizer.update(grads, state, setup.trainable)
        moved = [
            np.abs(np.asarray(u)).max()
            for path, u in jax.tree_util.tree_leaves_with_path(updates)
            if prefix in jax.tree_util.keystr(path)
        ]
        return float(np.min(moved)), float(np.max(moved))

    assert second_update(1e-3) == pytest.approx((1e-3, 1e-3), rel=1e-4)
    expected = DOCUMENTED_RATES[method]
    assert second_update(None) == pytest.approx((expected, expected), rel=1e-4)
