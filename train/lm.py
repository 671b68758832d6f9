"""Fine-tune a Flax Hugging Face causal language model (Llama, GPT-2, ...) with CDVFT or any registered method.

    python -m train.lm --model ./my-llama                                    # the tweets as prompt -> label
    python -m train.lm --model ./my-llama --task custom --train-file train.jsonl --eval-file dev.jsonl
    python -m train.lm --model ./my-llama --method lora --rank 8 --dtype bfloat16 --export-merged

``--model`` is a local folder: ``config.json``, Flax (``flax_model.msgpack``) or PyTorch weights and the
tokenizer.  No pretrained decoder language model ships on PyPI and the model hub is unreachable from this
project's machines, so nothing here downloads one: a real run passes ``--model`` a folder you provide (the
tests build tiny random Llama and GPT-2 folders).

Data (``--task custom``): JSON-lines files whose rows are either ``{"prompt": ..., "completion": ...}`` (loss
on the completion's tokens, and its end-of-sequence token, only) or ``{"text": ...}`` (loss on every token);
one file holds one kind.  ``--task tweets`` (the default) is the tweet-sentiment corpus of ``train.text`` as
``"Tweet: ...\\nSentiment:"`` -> ``" negative"`` / ``" neutral"`` / ``" positive"`` (the few tweets that do not
fit ``--max-length`` are dropped, and counted in ``results.json``).  Tokens: the tokenizer's
beginning-of-sequence token (if it has one), the prompt, then the completion and the end-of-sequence token,
prompt and completion tokenized apart.  A prompt that leaves no room for a completion token within
``--max-length`` is a data error; so is a completion that does not fit after its prompt, unless
``--truncate-completions`` cuts it (and counts it in ``results.json``).  Each batch is padded to the next
power of two (at least 16; ``--pad-multiple N``: a multiple of N), at most ``--max-length``, so few shapes
are compiled.

Evaluation before training and after every epoch: the dev loss (mean over the tokens that carry loss) and
perplexity, greedy generations for the first ``--num-generations`` dev prompts (also sampled ones with
``--sample-temperature``) in ``generations/step-NNNNNN.jsonl``, and ``exact_match`` (the greedy generation
and the completion equal after ``strip``) when the completions are short labels (``--exact-match True``; by
default when every dev completion is at most :data:`SHORT_COMPLETION_TOKENS` tokens).  The best evaluation
is the highest exact match, else the lowest loss.  Outputs in ``--output-dir`` are those of ``train.text``
(``metrics.jsonl``, ``results.json``, the adapter, checkpoints), plus ``merged/`` with ``--export-merged``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp
import numpy as np
import tyro

import cdvft_jax
from cdvft_jax import sharding
from cdvft_jax.config import ALL_LINEAR
from train.cli import check_count, check_rate
from train.data import DataError
from train.data.lm import LMExample, read_lm_jsonl, tweets_lm_dataset
from train.hooks import Hook
from train.loop import (
    ConfigError,
    Evaluation,
    Generation,
    RunConfig,
    RunFiles,
    TrainData,
    TrainSettings,
    digest,
    fixed_subset,
    mesh_from_flag,
    model_digest,
    parse_config,
    prepare_output,
    run_fingerprint,
    summary_table,
    tensorboard_folder,
    train_and_evaluate,
    write_results,
)
from train.methods import ADAPTER_METHODS, IGNORE_INDEX, NO_TOKEN, Batch, causal_lm_objective
from train.text import check_model_fits

# The layers adapted when --target-modules is not given: every linear layer but the output head, whatever
# the family (Llama's q/k/v/o_proj and gate/up/down_proj, GPT-2's FlaxConv1D c_attn, c_proj, c_fc).
DEFAULT_TARGET_MODULES = (ALL_LINEAR,)
SHORT_COMPLETION_TOKENS = 8
"""Dev completions of at most this many tokens are labels: exact match is scored unless --exact-match says no."""
SMALLEST_WIDTH = 16  # the narrowest padded batch with power-of-two buckets
TASKS = ("tweets", "custom")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(RunConfig):
    """Everything one language-model run needs; built from the command line by :func:`parse_args`.

    The training and run fields come from :class:`~train.loop.RunConfig`; these are the language-model ones.

    Attributes:
      model: local folder of a Hugging Face causal LM (config, Flax or PyTorch weights, tokenizer).
      task: tweets (the tweet corpus as prompt -> sentiment label) or custom (--train-file, --eval-file).
      train_file: JSON-lines training rows, prompt/completion or text (--task custom).
      eval_file: JSON-lines dev rows of the same kind (--task custom).
      max_length: tokens per sequence, special tokens included.
      truncate_completions: cut a completion (or a text row) that does not fit --max-length, counting it;
        without it such a row is an error.
      pad_multiple: pad batches to a multiple of this (None: the next power of two, at least 16).
      dtype: float32, or bfloat16: the frozen base weights stored and the model computed in bfloat16;
        adapter and other trainable leaves stay float32.
      gradient_checkpointing: recompute activations in the backward pass (the model's
        enable_gradient_checkpointing()).
      exact_match: score exact match of greedy generations on every dev example (None: when every dev
        completion is at most 8 tokens, its end token not counted).
      num_generations: write the generations of this many dev prompts at each evaluation.
      max_new_tokens: tokens generated per prompt (None: the longest dev completion's, end token included).
      sample_temperature: also write sampled generations at this temperature (seeded by --seed).
      export_merged: after training, write the adapter merged into the base model to output_dir/merged
        (a Flax checkpoint with the tokenizer; adapter methods).
      target_modules: the layers the adapter method adapts (all-linear: every linear layer but the output
        head).
      head_modules: modules trained in full beside the adapter (none by default; e.g. lm_head).
      epochs: passes over the training data.
      batch_size: sequences per optimizer step (the global batch on a mesh).
      output_dir: where metrics.jsonl, results.json, generations, the adapter and checkpoints go.
    """

    model: str
    task: str = "tweets"
    train_file: Path | None = None
    eval_file: Path | None = None
    max_length: int = 128
    truncate_completions: bool = False
    pad_multiple: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    exact_match: bool | None = None
    num_generations: int = 4
    max_new_tokens: int | None = None
    sample_temperature: float | None = None
    export_merged: bool = False
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    head_modules: tuple[str, ...] = ()
    epochs: int = 1
    batch_size: int = 8
    output_dir: Path = Path("outputs/lm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        files = (self.train_file, self.eval_file)
        if self.task == "custom" and None in files:
            raise ConfigError("--task custom needs --train-file and --eval-file (JSON-lines)")
        if self.task != "custom" and files != (None, None):
            raise ConfigError(f"--train-file and --eval-file are for --task custom, not --task {self.task}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(
                f"--max-length must be an int >= 2 (a prompt token and a target), got {self.max_length!r}"
            )
        check_count(self.pad_multiple, "pad_multiple", optional=True)
        check_count(self.max_new_tokens, "max_new_tokens", optional=True)
        check_count(self.num_generations, "num_generations", low=0)
        check_rate(self.sample_temperature, "sample_temperature", optional=True)
        if self.method == "head" and not self.head_modules:
            raise ConfigError("--method head trains --head-modules alone, and none are given (e.g. lm_head)")
        if self.export_merged and self.method not in ADAPTER_METHODS:
            raise ConfigError(f"--export-merged merges an adapter; --method {self.method} has none")


class Encoded(NamedTuple):
    """Tokenized examples.

    Attributes:
      examples: the examples, in order (without those dropped).
      input_ids: each example's tokens, prompt first.
      prompt_lengths: the leading tokens of each that carry no loss (0 for a text row).
      truncated: how many completions ``--truncate-completions`` cut.
      dropped: how many examples were dropped for not fitting (``--task tweets`` only).
    """

    examples: list[LMExample]
    input_ids: list[list[int]]
    prompt_lengths: list[int]
    truncated: int
    dropped: int


def load_examples(config: LMConfig) -> tuple[list[LMExample], list[LMExample]]:
    """Train and dev examples for ``config`` (the sample limits applied).

    Raises:
      DataError: a bad row (naming file and line), or train and dev of different kinds.
    """
    if config.task == "tweets":
        train, dev = tweets_lm_dataset(seed=0)
    else:
        train, dev = read_lm_jsonl(config.train_file), read_lm_jsonl(config.eval_file)
        if (train[0].prompt is None) != (dev[0].prompt is None):
            kinds = ["text" if part[0].prompt is None else "prompt/completion" for part in (train, dev)]
            raise DataError(
                f"{config.train_file} holds {kinds[0]} rows but {config.eval_file} holds {kinds[1]} rows; "
                "train and dev must be of one kind"
            )
    return fixed_subset(train, config.max_train_samples, config.seed), fixed_subset(dev, config.max_eval_samples, 0)


def encode(
    tokenizer: Any, examples: Sequence[LMExample], max_length: int, *, truncate: bool, drop_long: bool = False
) -> Encoded:
    """Tokenizes every example once: ``[bos] + prompt`` (no loss), then ``completion + [eos]``.

    ``truncate`` cuts a completion that does not fit after its prompt (and counts it); ``drop_long`` drops
    (and counts) an example whose prompt and completion do not fit, as ``--task tweets`` does with the
    corpus's few very long tweets.

    Raises:
      DataError: naming the example's file and line: a prompt without tokens; unless ``drop_long``, a
        prompt that leaves no room for one completion token within ``max_length``, or (unless ``truncate``)
        a completion that does not fit after its prompt.
    """
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    kept, ids, lengths, truncated = [], [], [], 0
    for example in examples:
        prompt = [] if example.prompt is None else bos + tokenizer(example.prompt, add_special_tokens=False).input_ids
        if example.prompt is None:
            target = bos + tokenizer(example.completion, add_special_tokens=False).input_ids
        else:
            target = tokenizer(example.completion, add_special_tokens=False).input_ids
        target = [*target, tokenizer.eos_token_id]
        if example.prompt is not None and not prompt:
            raise DataError(f"{example.source}: the prompt has no tokens; a generation needs at least one")
        if drop_long and len(prompt) + len(target) > max_length:
            continue
        if len(prompt) + 1 > max_length:
            raise DataError(
                f"{example.source}: the prompt is {len(prompt)} tokens, which leaves no room for its completion "
                f"within --max-length {max_length}; shorten it or raise --max-length (prompts are never cut)"
            )
        if len(prompt) + len(target) > max_length:
            if not truncate:
                what = "the text" if example.prompt is None else f"the completion after {len(prompt)} prompt tokens"
                raise DataError(
                    f"{example.source}: {what} is {len(target)} tokens (its end token included), more than "
                    f"--max-length {max_length} holds; raise --max-length or pass --truncate-completions"
                )
            target = target[: max_length - len(prompt)]
            truncated += 1
        kept.append(example)
        ids.append(prompt + target)
        lengths.append(len(prompt))
    return Encoded(kept, ids, lengths, truncated, len(examples) - len(kept))


def encoded_digest(data: Encoded) -> str:
    """A fingerprint of tokenized examples: every token, the prompt lengths and the completions' texts."""
    lengths = np.asarray([len(ids) for ids in data.input_ids], np.int64)
    ids = np.concatenate([np.asarray(ids, np.int64) for ids in data.input_ids])
    return digest(lengths, ids, np.asarray(data.prompt_lengths, np.int64), [e.completion for e in data.examples])


def target_counts(data: Encoded) -> np.ndarray:
    """Per example, how many tokens carry loss (a text row's first token is never predicted)."""
    return np.asarray([len(ids) - max(p, 1) for ids, p in zip(data.input_ids, data.prompt_lengths, strict=True)])


def padded_width(longest: int, max_length: int, pad_multiple: int | None) -> int:
    """The width a batch whose longest row is ``longest`` tokens is padded to, at most ``max_length``.

    >>> [padded_width(n, 128, None) for n in (3, 16, 17, 70, 128)]
    [16, 16, 32, 128, 128]
    >>> [padded_width(n, 100, 24) for n in (3, 25, 99)]
    [24, 48, 100]
    """
    if pad_multiple is None:
        width = max(SMALLEST_WIDTH, 1 << (longest - 1).bit_length())
    else:
        width = -(-longest // pad_multiple) * pad_multiple
    return min(max_length, width)


def batches(
    data: Encoded,
    batch_size: int,
    pad_id: int,
    max_length: int,
    pad_multiple: int | None,
    rng: np.random.Generator | None,
    *,
    count: int | None = None,
    room: int = 0,
) -> Iterator[Batch]:
    """Padded batches of the first ``count`` examples (all by default); shuffled and without the last
    partial batch when ``rng`` is given (training).

    ``labels`` hold the token ids that carry loss and :data:`~train.methods.IGNORE_INDEX` elsewhere (the
    prompt, padding).  Each batch is :func:`padded_width` wide, with ``room`` more tokens after every
    prompt (for generation), at most ``max_length``.
    """
    n = len(data.input_ids) if count is None else count
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if rng is not None else n
    for start in range(0, stop, batch_size):
        rows = order[start : start + batch_size]
        longest = max(max(len(data.input_ids[i]), data.prompt_lengths[i] + room) for i in rows)
        width = padded_width(longest, max_length, pad_multiple)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        labels = np.full((batch_size, width), IGNORE_INDEX, np.int32)
        for r, i in enumerate(rows):
            seq, prompt = data.input_ids[i], data.prompt_lengths[i]
            ids[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
            labels[r, prompt : len(seq)] = seq[prompt:]
        weights = np.zeros((batch_size,), np.float32)
        weights[: len(rows)] = 1.0
        yield Batch({"input_ids": ids, "attention_mask": mask}, labels, weights)


def lm_metrics(nll: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """``loss`` (the summed next-token loss over the summed token count) and ``perplexity`` (its exp).

    >>> lm_metrics(np.array([2.0, 4.0]), np.array([1, 3]))
    {'loss': 1.5, 'perplexity': 4.4816890703380645}
    """
    loss = float(np.sum(nll, dtype=np.float64) / np.sum(tokens))
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


class GenerationReport(Hook):
    """The generating half of an evaluation: decodes the generations, scores exact match, writes them.

    :meth:`metrics` is the evaluation's :class:`~train.loop.Generation` metrics; :meth:`on_evaluation`
    then writes what it decoded for the first ``written`` examples to ``folder/step-NNNNNN.jsonl`` (one JSON
    object a prompt: ``index``, ``source``, ``prompt``, ``completion``, ``greedy`` and ``sampled`` texts).  A
    redone evaluation (after ``--resume``) rewrites its step's file.
    """

    def __init__(
        self, tokenizer: Any, examples: Sequence[LMExample], folder: Path, *, written: int, exact_match: bool
    ) -> None:
        self.tokenizer, self.examples, self.folder = tokenizer, list(examples), folder
        self.written, self.exact_match = written, exact_match
        self._rows: list[dict[str, Any]] = []

    def decode(self, tokens: np.ndarray) -> str:
        """The text of generated ``tokens``, up to the end token or the first :data:`~train.methods.NO_TOKEN`."""
        kept = []
        for token in tokens.tolist():
            if token == NO_TOKEN or token == self.tokenizer.eos_token_id:
                break
            kept.append(token)
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """``exact_match`` of the greedy generations (when scored; else nothing), keeping the texts to write."""
        texts = {kind: [self.decode(row) for row in tokens] for kind, tokens in outputs.items()}
        self._rows = [
            {
                "index": i,
                "source": self.examples[i].source,
                "prompt": self.examples[i].prompt,
                "completion": self.examples[i].completion,
                **{kind: texts[kind][i] for kind in texts},
            }
            for i in range(min(self.written, len(texts["greedy"])))
        ]
        if not self.exact_match:
            return {}
        hits = [text.strip() == e.completion.strip() for text, e in zip(texts["greedy"], self.examples, strict=True)]
        return {"exact_match": float(np.mean(hits))}

    def on_evaluation(self, record: dict[str, Any]) -> None:
        """Writes the generations of the evaluation at ``record["step"]`` (process 0 only)."""
        if not self._rows or not sharding.is_main_process():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{record['step']:06d}.jsonl"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps({"step": record["step"], **row}) + "\n" for row in self._rows))
        temporary.replace(path)


def dev_evaluation(config: LMConfig, tokenizer: Any, dev: Encoded) -> tuple[Evaluation, GenerationReport, int | None]:
    """The dev evaluation of ``config``: loss and perplexity, generations and exact match; with the report
    that writes the generations, and how many tokens are generated (``None``: no generation).

    Raises:
      ConfigError: ``--exact-match`` on text rows.
    """
    pairs = dev.examples[0].prompt is not None
    completion_tokens = [len(ids) - p for ids, p in zip(dev.input_ids, dev.prompt_lengths, strict=True)]
    exact_match = config.exact_match
    if exact_match is None:
        exact_match = pairs and max(completion_tokens) - 1 <= SHORT_COMPLETION_TOKENS
    if exact_match and not pairs:
        raise ConfigError("--exact-match compares generations with completions; text rows have none")
    # How many dev prompts are generated for: all to score exact match, else those written (text rows: none).
    generated = len(dev.examples) if exact_match else min(config.num_generations, len(dev.examples)) * pairs
    max_new_tokens = (config.max_new_tokens or max(completion_tokens)) if generated else None

    def dev_batches(count: int | None = None, room: int = 0) -> Iterator[Batch]:
        pad_id = tokenizer.pad_token_id
        return batches(
            dev, config.batch_size, pad_id, config.max_length, config.pad_multiple, None, count=count, room=room
        )

    report = GenerationReport(
        tokenizer,
        dev.examples,
        config.output_dir / "generations",
        written=config.num_generations,
        exact_match=exact_match,
    )
    evaluation = Evaluation(
        batches=dev_batches,
        labels=target_counts(dev),
        metrics=lm_metrics,
        metric_names=("loss", "perplexity", *(("exact_match",) if exact_match else ())),
        main_metric="exact_match" if exact_match else "loss",
        generation=Generation(lambda: dev_batches(generated, room=max_new_tokens), report.metrics)
        if generated
        else None,
        greater_is_better=exact_match,
    )
    return evaluation, report, max_new_tokens


def has_flax_weights(folder: Path) -> bool:
    """Whether a Hugging Face folder holds Flax weights (else they are PyTorch's, loaded with ``from_pt``)."""
    return any((folder / name).is_file() for name in ("flax_model.msgpack", "flax_model.msgpack.index.json"))


def load_model(folder: Path, *, dtype: str = "float32", seed: int = 0) -> Any:
    """The causal LM of ``folder`` (``FlaxAutoModelForCausalLM``), computing in ``dtype``, params float32."""
    from transformers import FlaxAutoModelForCausalLM

    # float32 is the default: passing it would write "dtype": "numpy" into a config saved from this model.
    compute = {} if dtype == "float32" else {"dtype": getattr(jnp, dtype)}
    return FlaxAutoModelForCausalLM.from_pretrained(folder, from_pt=not has_flax_weights(folder), seed=seed, **compute)


def export_merged(model_folder: Path, adapter_dir: Path, out: Path, tokenizer: Any) -> Path:
    """The saved adapter merged into a fresh float32 copy of the base model, written to ``out`` (a Flax
    ``save_pretrained`` folder, with the tokenizer) that ``FlaxAutoModelForCausalLM`` loads."""
    from cdvft_jax.export import save_merged_flax

    base = load_model(model_folder)
    adapted, params = cdvft_jax.load_adapter(adapter_dir, base)
    save_merged_flax(base, adapted.merge(params), out)
    tokenizer.save_pretrained(out)
    return out


def run(config: LMConfig) -> dict:
    """Runs the fine-tuning described by ``config``; writes and returns ``results.json``'s content."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(config.model)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"--model {config.model}: not a local model folder (no config.json); no model is downloaded, "
            "pass a folder with config.json, the weights and the tokenizer"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"the tokenizer in {folder} has no end-of-sequence token; a completion needs one to end")
    if tokenizer.pad_token_id is None:  # padding carries no loss and is masked, so the end token serves
        tokenizer.pad_token = tokenizer.eos_token
    check_model_fits(AutoConfig.from_pretrained(folder), tokenizer, config.max_length)
    train, dev = (
        encode(
            tokenizer,
            examples,
            config.max_length,
            truncate=config.truncate_completions,
            drop_long=config.task == "tweets",
        )
        for examples in load_examples(config)
    )
    if not dev.examples:
        raise SystemExit(f"no dev example fits --max-length {config.max_length}")
    evaluation, report, max_new_tokens = dev_evaluation(config, tokenizer, dev)
    print(
        f"{config.task}: {len(train.examples):,} train / {len(dev.examples):,} dev examples "
        f"({'text' if dev.examples[0].prompt is None else 'prompt/completion'}), model {folder}"
        + (f"; {train.truncated + dev.truncated} completions truncated" if train.truncated + dev.truncated else "")
        + (f"; {train.dropped + dev.dropped} too long, dropped" if train.dropped + dev.dropped else "")
    )

    # A multi-process run joins its job before anything touches JAX.
    mesh = mesh_from_flag(
        config.mesh, coordinator=config.coordinator, num_processes=config.num_processes, process_id=config.process_id
    )
    if len(train.input_ids) < config.batch_size:
        raise SystemExit(f"{len(train.input_ids)} training examples do not fill one batch of {config.batch_size}")
    model = load_model(folder, dtype=config.dtype, seed=config.seed)
    if config.gradient_checkpointing:
        try:  # FlaxPreTrainedModel's own raises NotImplementedError; the models that have one override it
            model.enable_gradient_checkpointing()
        except NotImplementedError as e:
            raise ConfigError(
                f"--gradient-checkpointing: {type(model).__name__} has no enable_gradient_checkpointing() "
                "in this transformers version"
            ) from e
    fingerprint = run_fingerprint(
        config,
        model=model_digest(config.model),
        train_data=encoded_digest(train),
        dev_data=encoded_digest(dev),
    )
    log = prepare_output(config.output_dir, resume=config.resume, overwrite=config.overwrite, fingerprint=fingerprint)
    settings = TrainSettings.from_config(config)

    def train_batches(epoch: int) -> Iterator[Batch]:
        # Each epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches.
        rng = np.random.default_rng([config.seed, epoch])
        return batches(train, config.batch_size, tokenizer.pad_token_id, config.max_length, config.pad_multiple, rng)

    objective = causal_lm_objective(
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        temperature=config.sample_temperature,
        seed=config.seed,
    )
    data = TrainData(len(train.input_ids) // config.batch_size, train_batches, evaluation, False, objective)

    events = tensorboard_folder(config.output_dir)
    files = RunFiles(
        log_path=log,
        adapter_dir=config.output_dir / "adapter",
        checkpoint_dir=config.output_dir / "checkpoints" / config.method,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        tensorboard_dir=None if events is None else events / config.method,
    )
    run_result = train_and_evaluate(
        model,
        settings,
        data,
        files,
        description=f"{config.method} {config.task}",
        base_model=config.model,
        mesh=mesh,
        extra_hooks=[report],
        frozen_dtype=None if config.dtype == "float32" else getattr(jnp, config.dtype),
    )
    counts = {
        "truncated_completions": (train.truncated, dev.truncated),
        "dropped_too_long": (train.dropped, dev.dropped),
    }
    run_result = {**run_result, **{key: {"train": t, "dev": d} for key, (t, d) in counts.items()}}
    if config.export_merged and sharding.is_main_process():
        out = export_merged(folder, config.output_dir / "adapter", config.output_dir / "merged", tokenizer)
        print(f"merged model written to {out}")
    results = write_results(
        config.output_dir,
        task=config.task,
        model=config.model,
        settings=settings,
        config=dataclasses.asdict(config),
        runs=[run_result],
    )
    print(summary_table(config.task, evaluation.main_metric, [run_result]))
    return results


def parse_args(argv: Sequence[str] | None = None) -> LMConfig:
    """Command line -> :class:`LMConfig` (``--model`` is required)."""
    return parse_config(
        LMConfig, argv, prog="python -m train.lm", description=__doc__.split("\n\n")[0], model=tyro.MISSING
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m train.lm``."""
    run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
