"""Decoder language models: every linear layer of tiny random Llama, Mistral, Gemma and GPT-2 (and the other
Flax decoders of transformers 4.57), adapted, trained, merged, generated from and exported to PyTorch.

No pretrained decoder LM is reachable offline, so these are random configs of each family (as peft's own
tests do), built with grouped-query attention where the family has it, so ``k_proj`` / ``v_proj`` are
non-square.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import check_only_trainable_leaves_moved, trained_like
from test_cdv import dense_reference
from transformers import (
    BloomConfig,
    FlaxBloomForCausalLM,
    FlaxGemmaForCausalLM,
    FlaxGPT2LMHeadModel,
    FlaxGPTJForCausalLM,
    FlaxGPTNeoForCausalLM,
    FlaxLlamaForCausalLM,
    FlaxMistralForCausalLM,
    FlaxOPTForCausalLM,
    FlaxXGLMForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    XGLMConfig,
)

import cdvft_jax
from cdvft_jax.export import save_merged_torch
from cdvft_jax.layer_types import flax_layout
from cdvft_jax.params import flat_params

VOCAB = 64
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
DECODERS = {
    "llama": lambda: FlaxLlamaForCausalLM(LlamaConfig(**LLAMA_LIKE), seed=0),
    "mistral": lambda: FlaxMistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=16), seed=0),
    "gemma": lambda: FlaxGemmaForCausalLM(
        GemmaConfig(**LLAMA_LIKE, head_dim=8, hidden_activation="gelu_pytorch_tanh"), seed=0
    ),
    "gpt2": lambda: FlaxGPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64), seed=0
    ),
}
OTHER_DECODERS = {
    "gpt_neo": lambda: FlaxGPTNeoForCausalLM(
        GPTNeoConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
            window_size=8,
        ),
        seed=0,
    ),
    "gptj": lambda: FlaxGPTJForCausalLM(
        GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64), seed=0
    ),
    "opt": lambda: FlaxOPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        seed=0,
    ),
    "bloom": lambda: FlaxBloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), seed=0),
    "xglm": lambda: FlaxXGLMForCausalLM(
        XGLMConfig(
            vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=48, max_position_embeddings=64
        ),
        seed=0,
    ),
}
# GPT-2's c_attn, c_proj and c_fc are FlaxConv1D (kernel stored (out, in)); the others are nn.Dense.
KINDS = {"gpt2": "conv1d"}


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder(request):
    return request.param, DECODERS[request.param]()


def token_batch(batch: int = 3, length: int = 9, seed: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Token ids and an attention mask whose last row is left-padded, as a batch of prompts is."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (batch, length))
    mask = np.ones_like(ids)
    mask[-1, :3] = 0
    ids[-1, :3] = 0
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def kernel_paths(model) -> set[str]:
    """Every module with a 2-D ``kernel`` of its own (the independent count of linear layers)."""
    return {p.rpartition("/")[0] for p, v in flat_params(model.params).items() if p.endswith("/kernel") and v.ndim == 2}


def adapted_with_trained_adapter(model, config):
    adapted = cdvft_jax.inject(model, config)
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    return adapted, cdvft_jax.merge_params(trained_like(trainable, seed=1), frozen)


def test_all_linear_adapts_every_linear_layer_but_the_output_head_and_starts_at_the_base(decoder):
    name, model = decoder
    adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    expected = {p for p in kernel_paths(model) if p != "lm_head"}
    assert set(adapted.layers) == expected
    assert {layer.kind for layer in adapted.linear_layers.values() if layer.path in expected} == {
        KINDS.get(name, "dense")
    }
    shapes = {(layer.d_in, layer.d_out) for layer in adapted.layers.values()}
    assert any(d_in != d_out for d_in, d_out in shapes)  # GQA k/v, or the MLP, are non-square
    params = adapted.init(jax.random.key(0), model.params)
    ids, mask = token_batch()
    np.testing.assert_array_equal(
        adapted(ids, attention_mask=mask, params=params).logits, model(ids, attention_mask=mask).logits
    )


@pytest.mark.parametrize("name", list(OTHER_DECODERS))
def test_the_other_flax_decoders_adapt_every_linear_layer_and_merge(name):
    model = OTHER_DECODERS[name]()
    adapted, params = adapted_with_trained_adapter(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    assert set(adapted.layers) == {p for p in kernel_paths(model) if p != "lm_head"}
    ids, mask = token_batch()
    expected = adapted(ids, attention_mask=mask, params=params).logits
    assert np.abs(expected - model(ids, attention_mask=mask).logits).max() > 1e-2
    got = model(ids, attention_mask=mask, params=adapted.merge(params)).logits
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_merge_adds_the_float64_reference_dw_in_each_kernels_own_layout(decoder):
    name, model = decoder
    adapted, params = adapted_with_trained_adapter(model, cdvft_jax.CDVFTConfig(target_modules="all-linear", alpha=0.5))
    merged, flat = flat_params(adapted.merge(params)), flat_params(params)
    for path, layer in adapted.layers.items():
        reference = 0.5 * dense_reference(
            [flat[f"{path}/cdv_a_in"], flat[f"{path}/cdv_a_out"]], [flat[f"{path}/cdv_c"]]
        )  # (d_in, d_out), float64
        kernel = np.asarray(flat[f"{path}/kernel"], np.float64)
        if name == "gpt2":
            assert kernel.shape == (layer.d_out, layer.d_in)
        expected = kernel + flax_layout(reference, layer.kernel_layout)
        np.testing.assert_allclose(merged[f"{path}/kernel"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    ids, mask = token_batch()
    adapted_logits = adapted(ids, attention_mask=mask, params=params).logits
    merged_logits = model(ids, attention_mask=mask, params=adapted.merge(params)).logits
    np.testing.assert_allclose(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5 * np.abs(adapted_logits).max())


def causal_lm_loss(logits: jnp.ndarray, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean next-token cross-entropy over the positions whose target is a real token."""
    weights = mask[:, 1:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return (losses * weights).sum() / weights.sum()


@pytest.mark.parametrize("method", ["cdvft", "lora"])
def test_a_few_steps_lower_the_loss_and_leave_frozen_leaves_bitwise(decoder, method):
    _, model = decoder
    config = cdvft_jax.method_spec(method).config_class(target_modules="all-linear")
    adapted = cdvft_jax.inject(model, config)
    params = adapted.init(jax.random.key(0), model.params)
    before = {k: np.asarray(v) for k, v in flat_params(params).items()}
    trainable, frozen = adapted.split(params)
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=2e-2)
    state = cdvft_jax.init_train_state(trainable, optimizer)

    def loss_fn(p, batch, rng):
        ids, mask = batch
        return causal_lm_loss(adapted(ids, attention_mask=mask, params=p).logits, ids, mask)

    step = cdvft_jax.make_train_step(loss_fn, optimizer)
    losses = []
    for k in range(6):
        state, metrics = step(state, frozen, token_batch(), jax.random.key(k))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    check_only_trainable_leaves_moved(adapted, before, flat_params(cdvft_jax.merge_params(state.trainable, frozen)))


def test_adapted_and_merged_greedy_generation_give_the_same_tokens(decoder):
    _, model = decoder
    adapted, params = adapted_with_trained_adapter(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    ids, mask = token_batch(length=5)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with adapted.intercept():  # the model's own generate, its cache included, runs the adapted layers
        from_adapted = model.generate(ids, params=params, **settings).sequences
    from_merged = model.generate(ids, params=adapted.merge(params), **settings).sequences
    from_base = model.generate(ids, params=model.params, **settings).sequences
    np.testing.assert_array_equal(from_adapted, from_merged)
    assert not np.array_equal(from_adapted, from_base)  # the adapter changes what is generated


def test_merged_torch_export_gives_the_adapted_logits(decoder, tmp_path):
    torch = pytest.importorskip(
        "torch", reason="PyTorch is an optional test dependency; the PyTorch load checks need it"
    )
    from transformers import AutoModelForCausalLM

    _, model = decoder
    adapted, params = adapted_with_trained_adapter(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    ids, mask = token_batch()
    expected = np.asarray(adapted(ids, attention_mask=mask, params=params).logits)
    out = save_merged_torch(model, adapted.merge(params), tmp_path / "torch")
    pt_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    with torch.no_grad():
        got = pt_model.eval()(
            input_ids=torch.tensor(np.asarray(ids), dtype=torch.int64),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.int64),
        ).logits.numpy()
    real = np.asarray(mask, bool)  # padded positions differ between the frameworks' masking conventions
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_all_linear_leaves_out_classifier_heads_and_modules_to_save():
    from conftest import make_model

    model = make_model("roberta")
    config = cdvft_jax.CDVFTConfig(target_modules="all-linear", modules_to_save=["classifier"])
    adapted = cdvft_jax.inject(model, config)
    heads = {p for p in kernel_paths(model) if p.startswith("classifier")}
    assert heads and not heads & set(adapted.layers)
    assert set(adapted.layers) == kernel_paths(model) - heads
    assert cdvft_jax.CDVFTConfig.from_json(config.to_json()).target_modules == "all-linear"
    with pytest.raises(ValueError, match="finds no linear layer outside the output heads"):
        cdvft_jax.inject(
            model, cdvft_jax.CDVFTConfig(target_modules="all-linear", modules_to_save=["roberta", "classifier"])
        )


def test_stacked_adapters_generate_each_rows_own_tokens(decoder):
    _, model = decoder
    adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    adapters = [trained_like(trainable, seed) for seed in (1, 2)]
    stacked = cdvft_jax.merge_params(cdvft_jax.stack_adapters(adapted, adapters), frozen)
    ids, mask = token_batch(batch=3, length=5)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with adapted.intercept(adapted.adapter_rows(stacked, jnp.array([0, 1, -1]))):
        mixed = np.asarray(model.generate(ids, params=stacked, **settings).sequences)
    alone = [
        np.asarray(model.generate(ids, params=adapted.merge(cdvft_jax.merge_params(a, frozen)), **settings).sequences)
        for a in adapters
    ]
    base = np.asarray(model.generate(ids, params=model.params, **settings).sequences)
    for row, expected in enumerate([alone[0], alone[1], base]):
        np.testing.assert_array_equal(mixed[row], expected[row], err_msg=f"row {row}")
    assert not np.array_equal(alone[0], alone[1])  # the two adapters generate differently


def test_all_linear_is_case_insensitive_and_combines_with_exclude_modules():
    model = DECODERS["llama"]()
    config = cdvft_jax.CDVFTConfig(target_modules="All-Linear", exclude_modules=["mlp/down_proj"])
    assert config.target_modules == cdvft_jax.ALL_LINEAR
    adapted = cdvft_jax.inject(model, config)
    assert set(adapted.layers) == {p for p in kernel_paths(model) if p != "lm_head" and not p.endswith("down_proj")}
    assert "excluded" in adapted.describe()


def test_all_linear_leaves_out_a_masked_lm_decoder():
    from transformers import BertConfig, FlaxBertForMaskedLM

    model = FlaxBertForMaskedLM(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
            tie_word_embeddings=False,
        ),
        seed=0,
    )
    adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    assert "cls/predictions/decoder" in kernel_paths(model)
    assert set(adapted.layers) == kernel_paths(model) - {"cls/predictions/decoder"}


def test_a_conv1d_head_cannot_run_per_row():
    model = DECODERS["gpt2"]()
    config = cdvft_jax.CDVFTConfig(target_modules=["c_attn"], modules_to_save=["h/1/mlp/c_proj"])
    adapted = cdvft_jax.inject(model, config)
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    stacked = cdvft_jax.merge_params(cdvft_jax.stack_adapters(adapted, [trainable, trainable]), frozen)
    with pytest.raises(ValueError, match=r"per-row heads made of nn.Dense layers only; .*h/1/mlp/c_proj/(kernel|bias)"):
        adapted.adapter_rows(stacked, jnp.array([0, 1]))


def test_a_saved_decoder_adapter_exports_to_torch_from_the_command_line(tmp_path):
    torch = pytest.importorskip(
        "torch", reason="PyTorch is an optional test dependency; the PyTorch load checks need it"
    )
    from transformers import AutoModelForCausalLM

    from cdvft_jax.adapter_io import save_adapter
    from cdvft_jax.export import main

    model = DECODERS["llama"]()
    model.save_pretrained(tmp_path / "base")
    adapted, params = adapted_with_trained_adapter(model, cdvft_jax.CDVFTConfig(target_modules="all-linear"))
    save_adapter(tmp_path / "adapter", adapted, params, base_model=str(tmp_path / "base"))
    assert main(["--adapter", str(tmp_path / "adapter"), "--format", "torch", "--out", str(tmp_path / "torch")]) == 0
    ids, mask = token_batch()
    expected = np.asarray(adapted(ids, attention_mask=mask, params=params).logits)
    pt_model = AutoModelForCausalLM.from_pretrained(tmp_path / "torch").eval()
    with torch.no_grad():
        got = pt_model(
            input_ids=torch.tensor(np.asarray(ids), dtype=torch.int64),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.int64),
        ).logits.numpy()
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-4, atol=1e-5 * np.abs(expected).max())
