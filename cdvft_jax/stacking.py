"""Many adapters of one base model in one forward pass.

:func:`stack_adapters` turns N trained adapters of the same base, method and targets (their trainable
trees, heads included) into one tree whose every leaf has a leading adapter axis.  Merged with the frozen
tree, it runs with ``adapted(*inputs, params=..., adapter_ids=ids)``: batch row ``b`` runs adapter
``ids[b]`` and its head, ``-1`` the base model with adapter 0's head.  Each row gathers its own adapter
leaves (:meth:`~cdvft_jax.AdaptedModel.adapter_rows`), so the per-row work does not grow with N: for CDVFT
a row reads its 3 vectors per layer; LoRA runs a per-row batched matmul.

Adapters loaded from files (:func:`~cdvft_jax.load_adapter`) each come with their own adapted model;
:func:`adapter_difference` says whether two of them can share a stack.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from transformers import BertConfig, FlaxBertForSequenceClassification
  >>> import cdvft_jax
  >>> model = FlaxBertForSequenceClassification(BertConfig(
  ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
  ...     intermediate_size=37))
  >>> adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(modules_to_save=["classifier"]))
  >>> first, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
  >>> second = jax.tree.map(lambda leaf: leaf + 0.1, first)
  >>> params = cdvft_jax.merge_params(cdvft_jax.stack_adapters(adapted, [first, second]), frozen)
  >>> ids = jnp.ones((3, 8), jnp.int32)
  >>> logits = adapted(ids, params=params, adapter_ids=jnp.array([1, 0, -1])).logits
  >>> alone = adapted(ids[:1], params=cdvft_jax.merge_params(second, frozen)).logits
  >>> bool(jnp.allclose(logits[0], alone[0], atol=1e-5))
  True
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from cdvft_jax.injection import AdaptedModel
from cdvft_jax.params import Params, flat_params, unflat_params

__all__ = ["adapter_difference", "stack_adapters"]


def stack_adapters(adapted: AdaptedModel, trainables: Sequence[Params]) -> dict:
    """One tree holding ``trainables`` (each ``adapted.split(params)[0]`` of a trained adapter) along a
    new leading axis, in order: adapter ``i`` is ``trainables[i]``.

    Args:
      adapted: the adapted model every adapter was trained with (or loaded into).
      trainables: N >= 1 trainable trees: every adapter leaf but a method's frozen ones, and the
        ``modules_to_save`` leaves (the head).

    Returns:
      The stacked trainable tree; ``merge_params(stacked, frozen)`` is what ``adapted(...,
      adapter_ids=ids)`` takes.

    Raises:
      ValueError: no adapter, or one whose leaves or shapes are not those ``adapted`` trains (naming the
        adapter and the leaf).
    """
    if not trainables:
        raise ValueError("stack_adapters needs at least one adapter")
    expected = adapted.trainable_shapes()
    flats = []
    for number, tree in enumerate(trainables):
        flat = flat_params(tree)
        missing = sorted(set(expected) - set(flat))
        extra = sorted(set(flat) - set(expected))
        if missing or extra:
            parts = ([f"lacks {missing[:3]}"] if missing else []) + ([f"has no place for {extra[:3]}"] if extra else [])
            raise ValueError(
                f"adapter {number} is not a trainable tree of this adapted model: it {' and '.join(parts)} "
                "(pass adapted.split(params)[0] of adapters with the same method, targets and head)"
            )
        for path, shape in expected.items():
            if tuple(flat[path].shape) != shape:
                raise ValueError(
                    f"adapter {number}: {path!r} has shape {tuple(flat[path].shape)}, this adapted model's is {shape}"
                )
        flats.append(flat)
    return unflat_params({path: jnp.stack([flat[path] for flat in flats]) for path in expected})


def adapter_difference(first: AdaptedModel, other: AdaptedModel) -> str | None:
    """Why adapters of ``first`` and ``other`` cannot share a stack, or ``None`` when they can: another
    base model class, adapter config field (method, targets, alpha, sizes, head, ...) or layer shape.

    Example:
      >>> import cdvft_jax
      >>> from transformers import BertConfig, FlaxBertForSequenceClassification
      >>> model = FlaxBertForSequenceClassification(BertConfig(
      ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      ...     intermediate_size=37))
      >>> one = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(alpha=1.0))
      >>> cdvft_jax.adapter_difference(one, cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(alpha=2.0)))
      'adapter config differs in alpha: 1.0 vs 2.0'
    """
    if first.model_class != other.model_class:
        return f"base model class differs: {first.model_class} vs {other.model_class}"
    mine, theirs = first.config.to_dict(), other.config.to_dict()
    fields = [k for k in {**mine, **theirs} if mine.get(k) != theirs.get(k)]
    if fields:
        shown = "; ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in fields)
        return f"adapter config differs in {shown}"
    shapes, other_shapes = first.trainable_shapes(), other.trainable_shapes()
    if shapes != other_shapes:
        path = next(p for p in {**shapes, **other_shapes} if shapes.get(p) != other_shapes.get(p))
        return f"trainable leaf {path!r} differs: {shapes.get(path)} vs {other_shapes.get(path)}"
    return None
