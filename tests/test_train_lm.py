"""``python -m train.lm`` on tiny random Llama (and GPT-2) folders with a tokenizer trained offline on the tweets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import interrupt_train_step_at

import cdvft_jax
from cdvft_jax.params import flat_params
from train import lm
from train.data import DataError
from train.data.lm import LMExample, read_lm_jsonl
from train.loop import ConfigError, TrainSettings, setup_method
from train.methods import (
    ADAPTER_METHODS,
    IGNORE_INDEX,
    NO_TOKEN,
    causal_lm_objective,
    make_causal_lm_loss,
    make_generate,
    make_token_nll,
)
from train.runtime import make_runtime

REPO = Path(__file__).resolve().parents[1]
TWEETS = ("--max-train-samples", "48", "--max-eval-samples", "12", "--batch-size", "8")


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoTokenizer, FlaxLlamaForCausalLM

    return FlaxLlamaForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


def pairs(n: int) -> list[LMExample]:
    """Prompt/completion pairs of varied lengths."""
    words = "the quick brown fox jumps over a lazy dog at noon".split()
    return [
        LMExample(f" {words[i % 11]}", "Tweet: " + " ".join(words[: 2 + (3 * i) % 9]) + "\nSentiment:", f"row {i}")
        for i in range(n)
    ]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_the_loss_is_the_cross_entropy_of_the_completion_tokens_only(llama):
    model, tokenizer = llama
    examples = [*pairs(3), LMExample("a text row with loss on every token", None, "text row")]
    data = lm.encode(tokenizer, examples, 128, truncate=False)
    batch = next(lm.batches(data, 6, tokenizer.pad_token_id, 128, None, rng=None))  # 4 rows + 2 of weight 0
    logits = np.asarray(model(**batch.inputs).logits)

    # By hand: the logits at t - 1 predict token t, for t from the prompt's end (1 for a text row) to the end.
    losses, per_row = [], []
    for r, (ids, prompt) in enumerate(zip(data.input_ids, data.prompt_lengths, strict=True)):
        logp = log_softmax(logits[r])
        row = [-logp[t - 1, ids[t]] for t in range(max(prompt, 1), len(ids))]
        losses += row
        per_row.append(sum(row))
    assert data.prompt_lengths[3] == 0 and all(p > 0 for p in data.prompt_lengths[:3])

    loss = make_causal_lm_loss(model.__call__, dropout=False)(model.params, batch, jax.random.key(0))
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
    nll = np.asarray(make_token_nll(model.__call__)(model.params, batch))
    np.testing.assert_allclose(nll[:4], per_row, rtol=1e-5)
    np.testing.assert_array_equal(nll[4:], 0.0)
    np.testing.assert_array_equal(
        lm.target_counts(data),
        [len(ids) - max(p, 1) for ids, p in zip(data.input_ids, data.prompt_lengths, strict=True)],
    )
    # The dev metrics are the token-weighted mean and its exponential.
    metrics = lm.lm_metrics(nll[:4], lm.target_counts(data))
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(np.mean(losses)), rtol=1e-5)


def test_batches_pad_to_powers_of_two_with_labels_on_the_completion(llama):
    _, tokenizer = llama
    data = lm.encode(tokenizer, pairs(5), 128, truncate=False)
    longest = max(len(ids) for ids in data.input_ids)
    batch = next(lm.batches(data, 8, tokenizer.pad_token_id, 128, None, rng=None))
    width = batch.inputs["input_ids"].shape[1]
    assert width >= max(16, longest) and width & (width - 1) == 0 and width < 2 * max(16, longest)
    for r, (ids, prompt) in enumerate(zip(data.input_ids, data.prompt_lengths, strict=True)):
        np.testing.assert_array_equal(batch.inputs["input_ids"][r, : len(ids)], ids)
        assert batch.inputs["attention_mask"][r].tolist() == [1] * len(ids) + [0] * (width - len(ids))
        expected = [IGNORE_INDEX] * prompt + ids[prompt:] + [IGNORE_INDEX] * (width - len(ids))
        assert batch.labels[r].tolist() == expected
    assert batch.weights.tolist() == [1] * 5 + [0] * 3
    # Room for generated tokens after the longest prompt widens the batch; a multiple replaces the powers.
    roomy = next(lm.batches(data, 8, tokenizer.pad_token_id, 128, None, rng=None, room=60))
    assert roomy.inputs["input_ids"].shape[1] == lm.padded_width(max(data.prompt_lengths) + 60, 128, None)
    multiple = next(lm.batches(data, 8, tokenizer.pad_token_id, 128, 24, rng=None))
    assert multiple.inputs["input_ids"].shape[1] % 24 == 0


def test_greedy_generation_matches_one_row_at_a_time(llama):
    model, tokenizer = llama
    data = lm.encode(tokenizer, pairs(3), 128, truncate=False)
    batch = next(lm.batches(data, 4, tokenizer.pad_token_id, 128, None, rng=None, room=6))
    generate = jax.jit(make_generate(model.__call__, max_new_tokens=6, eos_id=tokenizer.eos_token_id))
    greedy = np.asarray(generate(model.params, batch)["greedy"])
    for r, (ids, prompt) in enumerate(zip(data.input_ids, data.prompt_lengths, strict=True)):
        sequence, expected = list(ids[:prompt]), []
        while len(expected) < 6:  # the reference: the unpadded row alone, one forward pass per token
            token = int(np.argmax(model(jnp.asarray([sequence])).logits[0, -1]))
            expected.append(token)
            sequence.append(token)
            if token == tokenizer.eos_token_id:
                break
        assert greedy[r].tolist() == expected + [NO_TOKEN] * (6 - len(expected)), r


def test_sampling_is_seeded(llama):
    model, tokenizer = llama
    batch = next(lm.batches(lm.encode(tokenizer, pairs(2), 128, truncate=False), 2, 0, 128, None, None, room=5))

    def sampled(seed):
        step = make_generate(
            model.__call__, max_new_tokens=5, eos_id=tokenizer.eos_token_id, temperature=2.0, seed=seed
        )
        return np.asarray(jax.jit(step)(model.params, batch)["sampled"])

    np.testing.assert_array_equal(sampled(3), sampled(3))
    assert not np.array_equal(sampled(3), sampled(4))


def _steps(setup, batch, steps=6):
    """``steps`` train steps of ``setup`` on ``batch``: the losses and the final state."""
    runtime = make_runtime(setup, objective=causal_lm_objective(), seed=0, mesh=None)
    state, losses = runtime.state, []
    for k in range(steps):
        state, metrics = runtime.train_step(state, runtime.frozen, batch, jax.random.key(k))
        losses.append(float(metrics["loss"]))
    return losses, state, runtime.frozen


MLP = ("gate_proj", "up_proj", "down_proj")
SIZES = {"fourierft": {"n_frequency": 64}, "vera": {"rank": 16}, "lora": {"rank": 4}}


@pytest.mark.parametrize("method", [*ADAPTER_METHODS, "full", "head"])
def test_every_method_lowers_the_loss_and_keeps_frozen_leaves(llama, method):
    model, tokenizer = llama
    settings = TrainSettings(
        method=method,
        learning_rate=2e-2 if method != "full" else 1e-3,
        head_learning_rate=1e-2,
        target_modules=lm.DEFAULT_TARGET_MODULES,
        head_modules=("lm_head",) if method == "head" else (),
        **SIZES.get(method, {}),
    )
    setup = setup_method(method, model, settings, total_steps=100)
    batch = next(lm.batches(lm.encode(tokenizer, pairs(4), 128, truncate=False), 4, 0, 128, None, None))
    before = {p: np.asarray(v) for p, v in flat_params(cdvft_jax.merge_params(setup.trainable, setup.frozen)).items()}
    trainable_paths = set(flat_params(setup.trainable))
    losses, state, frozen = _steps(setup, batch)
    assert losses[-1] < losses[0], losses
    after = flat_params(cdvft_jax.merge_params(state.trainable, frozen))
    assert set(after) == set(before)
    for path, value in after.items():
        if path not in trainable_paths:
            np.testing.assert_array_equal(value, before[path], err_msg=path)
    assert any(not np.array_equal(after[p], before[p]) for p in trainable_paths)
    if method in ADAPTER_METHODS:  # the default: every linear layer of each block, not the output head
        assert sorted(setup.adapted.layers) == sorted(
            f"model/layers/{i}/{part}/{name}"
            for i in range(2)
            for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", MLP))
            for name in names
        )


@pytest.mark.parametrize("method", ["cdvft", "vera"])
def test_bfloat16_stores_the_base_in_bfloat16_and_trains_in_float32(tiny_llama, llama, method):
    _, tokenizer = llama
    model = lm.load_model(tiny_llama, dtype="bfloat16")
    settings = TrainSettings(
        method=method,
        learning_rate=2e-2,
        target_modules=lm.DEFAULT_TARGET_MODULES,
        head_modules=(),
        **SIZES.get(method, {}),
    )
    setup = setup_method(method, model, settings, total_steps=100, frozen_dtype=jnp.bfloat16)
    frozen = flat_params(setup.frozen)
    for path, leaf in frozen.items():
        expected = jnp.float32 if setup.adapted.is_adapter_leaf(path) else jnp.bfloat16  # VeRA's projections
        assert leaf.dtype == expected, path
    assert method != "vera" or any(setup.adapted.is_adapter_leaf(p) for p in frozen)
    batch = next(lm.batches(lm.encode(tokenizer, pairs(4), 128, truncate=False), 4, 0, 128, None, None))
    losses, state, after = _steps(setup, batch, steps=4)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert {leaf.dtype for leaf in flat_params(state.trainable).values()} == {jnp.dtype(jnp.float32)}
    for path, leaf in flat_params(after).items():
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), np.asarray(frozen[path], np.float32), err_msg=path)


def run(out: Path, model: Path, *args: str) -> tuple[dict, list[dict]]:
    lm.main(["--model", str(model), "--output-dir", str(out), *args])
    results = json.loads((out / "results.json").read_text())
    return results, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tweets_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("lm-tweets") / "out"
    results, records = run(out, tiny_llama, *TWEETS, "--epochs", "2", "--learning-rate", "2e-2", "--export-merged")
    return out, results, records


def test_tweets_run_writes_what_it_claims(tiny_llama, tweets_run):
    out, results, records = tweets_run
    assert results["task"] == "tweets" and results["method"] == "cdvft"
    dropped = results["runs"][0]["dropped_too_long"]
    steps = (48 - dropped["train"]) // 8
    assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (steps, 1), (2 * steps, 2)]
    # Labels of at most 8 tokens: exact match is scored, and picks the best epoch.
    assert set(results["best"]) == {"loss", "perplexity", "exact_match"}
    n_dev = 12 - dropped["dev"]
    for r in records:
        assert float(r["exact_match"] * n_dev).is_integer()
        np.testing.assert_allclose(r["perplexity"], np.exp(r["loss"]), rtol=1e-12)
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["train_loss"] < records[1]["train_loss"]
    best = max(records[1:], key=lambda r: r["exact_match"])
    assert results["best_epoch"] == best["epoch"]
    # CDVFT trains d_in + d_out + d_in * d_out / p numbers a layer (p: the smaller side): q and o 32 x 32,
    # k and v 32 x 16, gate and up 32 x 64, down 64 x 32; 2 layers.
    assert results["trainable_params"] == 2 * (2 * 96 + 2 * 80 + 3 * 160)
    assert cdvft_jax.read_adapter_config(out / "adapter")["base_model"] == str(tiny_llama)
    # Generations of the first 4 dev prompts at every evaluation.
    for r in records:
        rows = [
            json.loads(line) for line in (out / "generations" / f"step-{r['step']:06d}.jsonl").read_text().splitlines()
        ]
        assert [row["index"] for row in rows] == [0, 1, 2, 3]
        assert all(row["prompt"].startswith("Tweet: ") and row["prompt"].endswith("\nSentiment:") for row in rows)
        assert all(row["completion"] in (" negative", " neutral", " positive") for row in rows)
        assert all(isinstance(row["greedy"], str) and row["step"] == r["step"] for row in rows)


def test_the_merged_export_gives_the_adapted_model(tiny_llama, tweets_run, llama):
    from transformers import FlaxLlamaForCausalLM

    out, _, _ = tweets_run
    base, tokenizer = llama
    adapted, params = cdvft_jax.load_adapter(out / "adapter", FlaxLlamaForCausalLM.from_pretrained(tiny_llama))
    merged = FlaxLlamaForCausalLM.from_pretrained(out / "merged")
    batch = next(lm.batches(lm.encode(tokenizer, pairs(3), 128, truncate=False), 3, 0, 128, None, None))
    expected = adapted(**batch.inputs, params=params).logits
    got = merged(**batch.inputs).logits
    assert np.abs(expected - base(**batch.inputs).logits).max() > 1e-4  # the adapter moved the model
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    # Only the adapted kernels differ from the base; everything else is the base's, bitwise.
    base_flat, merged_flat = flat_params(base.params), flat_params(merged.params)
    assert set(base_flat) == set(merged_flat)
    for path, value in merged_flat.items():
        if path.rpartition("/")[0] in adapted.layers:
            assert not np.array_equal(value, base_flat[path]), path
        else:
            np.testing.assert_array_equal(value, base_flat[path], err_msg=path)
    assert (out / "merged" / "tokenizer.json").is_file()


def test_resume_after_an_interruption_ends_where_a_straight_run_ends(tmp_path, tiny_llama, monkeypatch):
    args = (*TWEETS, "--max-train-samples", "32", "--epochs", "2", "--checkpoint-every", "2", "--num-generations", "2")
    straight, straight_records = run(tmp_path / "straight", tiny_llama, *args)
    interrupt_train_step_at(monkeypatch, 5)  # in the second epoch, after the checkpoint of step 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", tiny_llama, *args)
    monkeypatch.undo()
    resumed, resumed_records = run(tmp_path / "resumed", tiny_llama, *args, "--resume")
    assert resumed_records == straight_records
    assert resumed["best"] == straight["best"]
    saved = [
        safetensors.numpy.load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        for name in ("straight", "resumed")
    ]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        np.testing.assert_array_equal(saved[1][key], saved[0][key], err_msg=key)
    generations = [
        sorted(p.name for p in (tmp_path / name / "generations").iterdir()) for name in ("straight", "resumed")
    ]
    assert generations[0] == generations[1]
    for name in generations[0]:
        assert (tmp_path / "resumed" / "generations" / name).read_text() == (
            tmp_path / "straight" / "generations" / name
        ).read_text()
    with pytest.raises(SystemExit, match="differ"):  # another run's settings are refused
        run(tmp_path / "resumed", tiny_llama, *args, "--resume", "--learning-rate", "1e-3")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_text_rows_train_on_every_token_without_generations(tmp_path, tiny_llama):
    rows = [{"text": f"sample {i}: the quick brown fox jumps over the lazy dog {i % 3} times"} for i in range(24)]
    train, dev = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows[:5])
    out = tmp_path / "out"
    results, records = run(
        out,
        tiny_llama,
        *("--task", "custom", "--train-file", str(train), "--eval-file", str(dev), "--method", "lora", "--rank", "2"),
        *("--epochs", "2", "--learning-rate", "2e-2", "--pad-multiple", "8"),
    )
    assert set(results["best"]) == {"loss", "perplexity"}
    assert records[-1]["loss"] < records[0]["loss"]
    assert results["best"]["loss"] == min(r["loss"] for r in records[1:])  # the lowest loss is the best
    assert not (out / "generations").exists()


BAD_ROWS = [
    ([{"prompt": "a"}], r"line 1: missing key 'completion'"),
    ([{"completion": "a"}], r"line 1: missing key 'prompt'"),
    ([{"input": "a"}], r"line 1: expected keys 'prompt' and 'completion', or 'text'"),
    ([{"prompt": "a", "completion": "b", "text": "c"}], r"line 1: .*not both kinds"),
    (
        [{"prompt": "a", "completion": "b"}, "", {"text": "c"}],
        r"line 3: a text row in a file of prompt/completion rows \(line 1\)",
    ),
    ([{"prompt": "a", "completion": "  "}], r"line 1: empty completion"),
    ([{"text": ""}], r"line 1: empty text"),
    ([{"prompt": "a", "completion": 3}], r"line 1: 'completion' must be a string, found number"),
    (["{not json"], r"line 1: not valid JSON"),
    (["[1, 2]"], r"line 1: expected a JSON object, found array"),
    ([""], r"no data rows"),
]


@pytest.mark.parametrize(("rows", "message"), BAD_ROWS)
def test_bad_rows_are_data_errors_naming_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=rf"rows\.jsonl.*{message}"):
        read_lm_jsonl(path)


def test_long_prompts_are_refused_and_long_completions_refused_or_counted(llama):
    _, tokenizer = llama
    long_prompt = LMExample(" yes", "word " * 60, "dev.jsonl, line 7")
    with pytest.raises(DataError, match=r"dev\.jsonl, line 7: the prompt is \d+ tokens.*--max-length 48"):
        lm.encode(tokenizer, [long_prompt], 48, truncate=True)
    long_completion = LMExample(" word" * 60, "Q:", "dev.jsonl, line 2")
    with pytest.raises(DataError, match=r"dev\.jsonl, line 2: the completion .*--truncate-completions"):
        lm.encode(tokenizer, [long_completion], 48, truncate=False)
    with pytest.raises(DataError, match=r"line 3: the text is"):
        lm.encode(tokenizer, [LMExample(" word" * 60, None, "line 3")], 48, truncate=False)
    cut = lm.encode(tokenizer, [long_completion, *pairs(2)], 48, truncate=True)
    assert (
        cut.truncated == 1
        and len(cut.input_ids[0]) == 48
        and cut.input_ids[1:] == lm.encode(tokenizer, pairs(2), 48, truncate=False).input_ids
    )
    dropped = lm.encode(tokenizer, [long_prompt, *pairs(2)], 48, truncate=False, drop_long=True)
    assert dropped.dropped == 1 and dropped.examples == pairs(2)
    with pytest.raises(DataError, match="line 4: the prompt has no tokens"):
        lm.encode(tokenizer, [LMExample(" a", "", "line 4")], 48, truncate=False)


def test_train_and_dev_of_different_kinds_are_refused(tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "some words here"}] * 8)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"train\.jsonl holds text rows but .*dev\.jsonl holds prompt/completion"):
        run(tmp_path / "out", tiny_llama, "--task", "custom", "--train-file", str(train), "--eval-file", str(dev))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--task", "custom"), "--task custom needs --train-file and --eval-file"),
        (("--train-file", "a.jsonl"), "are for --task custom"),
        (("--method", "head"), "--method head trains --head-modules alone"),
        (("--method", "full", "--export-merged"), "--export-merged merges an adapter"),
        (("--max-length", "1"), "--max-length must be an int >= 2"),
        (("--num-generations", "-1"), "--num-generations must be an int >= 0"),
        (("--sample-temperature", "0"), "--sample-temperature must be a finite number > 0"),
        (("--task", "nope"), "--task must be one of tweets, custom"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as raised:
        lm.parse_args(["--model", "m", *args])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_run_errors_name_the_problem(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="not a local model folder"):
        run(tmp_path / "a", tmp_path / "missing")
    rows = [{"text": "some words here"}] * 8
    train, dev = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows)
    custom = ("--task", "custom", "--train-file", str(train), "--eval-file", str(dev))
    with pytest.raises(ConfigError, match="--exact-match compares generations with completions"):
        run(tmp_path / "b", tiny_llama, *custom, "--exact-match", "True")
    with pytest.raises(ConfigError, match="FlaxLlamaForCausalLM has no enable_gradient_checkpointing"):
        run(tmp_path / "c", tiny_llama, *custom, "--gradient-checkpointing")


def test_gpt2_conv1d_layers_train_and_export(tmp_path, tiny_gpt2, llama):
    from transformers import FlaxGPT2LMHeadModel

    _, tokenizer = llama
    rows = [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}"} for i in range(24)]
    train, dev = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows[:6])
    out = tmp_path / "out"
    results, records = run(
        out,
        tiny_gpt2,
        *("--task", "custom", "--train-file", str(train), "--eval-file", str(dev), "--epochs", "2"),
        *("--learning-rate", "2e-2", "--export-merged"),  # the default all-linear: the Conv1D layers
    )
    assert records[-1]["loss"] < records[0]["loss"] and "exact_match" in results["best"]
    adapted, params = cdvft_jax.load_adapter(out / "adapter", FlaxGPT2LMHeadModel.from_pretrained(tiny_gpt2))
    assert len(adapted.layers) == 2 * 4  # c_attn, attn/c_proj, c_fc, mlp/c_proj in each block; not lm_head
    batch = next(lm.batches(lm.encode(tokenizer, pairs(3), 128, truncate=False), 3, 0, 128, None, None))
    expected = adapted(**batch.inputs, params=params).logits
    got = FlaxGPT2LMHeadModel.from_pretrained(out / "merged")(**batch.inputs).logits
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_a_sharded_run_matches_the_single_device_run(tmp_path, tiny_llama):
    """``--mesh data=2,fsdp=2`` on 4 CPU devices (a subprocess: the device count is fixed when jax starts)."""
    args = [*TWEETS, "--max-train-samples", "32", "--epochs", "1", "--num-generations", "2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    flags = ["--model", str(tiny_llama), *args, "--output-dir", str(tmp_path / "mesh"), "--mesh", "data=2,fsdp=2"]
    done = subprocess.run(
        [sys.executable, "-m", "train.lm", *flags], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, single = run(tmp_path / "single", tiny_llama, *args)
    sharded = [json.loads(line) for line in (tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sharded] == [r["step"] for r in single]
    for got, want in zip(sharded, single, strict=True):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded[-1]["train_loss"], single[-1]["train_loss"], rtol=1e-5)
    rows = [(tmp_path / name / "generations" / "step-000000.jsonl").read_text() for name in ("mesh", "single")]
    assert rows[0] == rows[1]  # the untrained model's greedy generations, identical


@pytest.fixture(scope="module")
def tiny_bert_decoder(tmp_path_factory, llama) -> Path:
    """A tiny random BERT causal LM (``FlaxBertForCausalLM``: one with ``enable_gradient_checkpointing``)."""
    from transformers import BertConfig, FlaxBertForCausalLM

    _, tokenizer = llama
    folder = tmp_path_factory.mktemp("tiny-bert-decoder")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        is_decoder=True,
    )
    FlaxBertForCausalLM(config, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_gradient_checkpointing_trains_exactly_as_without(tmp_path, tiny_bert_decoder):
    rows = [{"text": f"sample {i}: the quick brown fox jumps over the lazy dog"} for i in range(16)]
    train, dev = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows[:4])
    args = ("--task", "custom", "--train-file", str(train), "--eval-file", str(dev), "--learning-rate", "2e-2")
    _, plain = run(tmp_path / "plain", tiny_bert_decoder, *args)
    _, checkpointed = run(tmp_path / "checkpointed", tiny_bert_decoder, *args, "--gradient-checkpointing")
    assert [r["step"] for r in checkpointed] == [r["step"] for r in plain] == [0, 2]
    for got, want in zip(checkpointed, plain, strict=True):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert plain[-1]["loss"] < plain[0]["loss"]
