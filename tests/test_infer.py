"""``python -m train.infer``: many adapters of one base in mixed batches, each row as its adapter alone."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import trained_like
from transformers import AutoTokenizer, FlaxBertForSequenceClassification

import cdvft_jax
from cdvft_jax.params import flat_params, merge_params, unflat_params
from train import infer

ROWS = [
    {"adapter": "a", "text": "a fine film"},
    {"adapter": "b", "text": "an awful film", "text_pair": "it was long"},
    {"text": "no adapter named: the base model with a's head"},
    {"adapter": "b", "text": "great"},
    {"adapter": None, "text": "null is the base model too"},
    {"adapter": "a", "text": "the last row", "text_pair": "of a partial batch"},
    {"adapter": "b", "text": "bad acting, good music"},
    {"adapter": "b", "text": "a fine film"},  # row 0's text under b and under the base model:
    {"text": "a fine film"},  # a row scored by the wrong adapter would show below
]


def save_adapters(tmp_path, tiny_model, config, names=("a", "b")):
    model = FlaxBertForSequenceClassification.from_pretrained(tiny_model, num_labels=3, seed=0)
    adapted = cdvft_jax.inject(model, config)
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    folders = []
    for seed, name in enumerate(names, 1):
        folder = tmp_path / name / "adapter"
        params = merge_params(trained_like(trainable, seed), frozen)
        cdvft_jax.save_adapter(folder, adapted, params, base_model=str(tiny_model))
        folders.append(folder)
    return model, folders


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_mixed_batches_score_each_row_with_its_adapter(tmp_path, tiny_model):
    config = cdvft_jax.CDVFTConfig(modules_to_save=["classifier"])
    model, (a, b) = save_adapters(tmp_path, tiny_model, config)
    rows = write_rows(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "predictions.jsonl"
    infer.main(
        [
            *("--model", str(tiny_model), "--adapters", f"a={a}", f"b={b}", "--num-labels", "3"),
            *("--input", str(rows), "--output", str(out), "--batch-size", "3"),
        ]
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in written] == list(range(len(ROWS)))
    assert [r["adapter"] for r in written] == [row.get("adapter") for row in ROWS]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    loaded = {name: cdvft_jax.load_adapter(folder, model) for name, folder in (("a", a), ("b", b))}
    adapted = loaded["a"][0]
    # The base model run without interception, with a's head: what rows without an adapter get.
    head = {p: v for p, v in flat_params(loaded["a"][1]).items() if not adapted.is_adapter_leaf(p)}
    base_params = unflat_params({**flat_params(model.params), **head})
    for row, record in zip(ROWS, written, strict=True):
        inputs = {
            k: jnp.asarray(v) for k, v in tokenizer(row["text"], row.get("text_pair"), return_tensors="np").items()
        }
        name = row.get("adapter")
        if name is None:
            logits = model(**inputs, params=base_params).logits
        else:
            logits = loaded[name][0](**inputs, params=loaded[name][1]).logits
        expected = np.asarray(jax.nn.softmax(logits[0]))
        np.testing.assert_allclose(record["scores"], expected, rtol=0, atol=1e-5, err_msg=str(row))
        assert record["label"] == int(np.argmax(expected))
    scores = np.asarray([r["scores"] for r in written])
    for one, other in ((0, 7), (0, 8), (7, 8)):  # one text under a, b and the base model: three scores
        assert np.abs(scores[one] - scores[other]).max() > 1e-3, (one, other)


def test_bad_rows_and_adapters_are_named_before_anything_runs(tmp_path, tiny_model):
    config = cdvft_jax.CDVFTConfig(modules_to_save=["classifier"])
    _, (a, b) = save_adapters(tmp_path, tiny_model, config)
    out = tmp_path / "predictions.jsonl"

    def run(rows, *adapters):
        path = rows if not isinstance(rows, list) else write_rows(tmp_path / "rows.jsonl", rows)
        argv = ["--model", str(tiny_model), "--adapters", *map(str, adapters), "--num-labels", "3"]
        infer.main([*argv, "--input", str(path), "--output", str(out)])

    with pytest.raises(SystemExit, match=r"rows.jsonl:2: adapter 'c' is not among --adapters \(a, b\)"):
        run([{"adapter": "a", "text": "x"}, {"adapter": "c", "text": "y"}], f"a={a}", f"b={b}")
    with pytest.raises(SystemExit, match=r"rows\.jsonl:1: a text model needs a string 'text'"):
        run([{"adapter": "a", "image": "x.png"}], f"a={a}")
    (tmp_path / "torn.jsonl").write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(SystemExit, match=r"torn\.jsonl:2: not a JSON object"):
        run(tmp_path / "torn.jsonl", f"a={a}")
    with pytest.raises(SystemExit) as twice:
        run([{"text": "x"}], a, b)  # both folders are named "adapter"
    assert twice.value.code == 2
    lora = cdvft_jax.LoRAConfig(rank=2, modules_to_save=["classifier"])
    _, (c,) = save_adapters(tmp_path / "lora", tiny_model, lora, names=("c",))
    with pytest.raises(SystemExit, match=r"adapter 'c' .* cannot share a batch .*method: 'cdvft' vs 'lora'"):
        run([{"text": "x"}], f"a={a}", f"c={c}")
    (b / "adapter_model.safetensors").write_bytes(b"damaged")
    with pytest.raises(SystemExit, match=r"adapter 'b' \("):
        run([{"text": "x"}], f"a={a}", f"b={b}")
    assert not out.exists()


GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


@pytest.mark.skipif(not GLUE.is_dir(), reason=f"the shared GLUE files are not at {GLUE}")
def test_real_minilm_adapters_of_two_tasks_score_a_mixed_file(tmp_path):
    """Two CDVFT adapters of the real all-MiniLM-L6-v2, trained by train.text on SST-2 and CoLA."""
    from train import text

    model_path = text.default_model_path()
    folders = {}
    for task, folder in (("sst2", "SST-2"), ("cola", "CoLA")):
        out = tmp_path / task
        text.main(
            [
                *("--model", model_path, "--task", task, "--data-dir", str(GLUE / folder), "--output-dir", str(out)),
                *("--max-train-samples", "64", "--max-eval-samples", "16", "--epochs", "1", "--batch-size", "16"),
                *("--max-length", "32", "--learning-rate", "2e-2"),
            ]
        )
        folders[task] = out / "adapter"
    sentences = ["a gripping, beautiful film", "the him saw she", "dull and far too long", "John likes Mary."]
    rows = [{"adapter": task, "text": s} for s in sentences for task in ("sst2", "cola", None)]
    write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    infer.main(
        [
            *("--model", model_path, "--adapters", *(f"{t}={f}" for t, f in folders.items()), "--num-labels", "2"),
            *("--input", str(tmp_path / "rows.jsonl"), "--output", str(out), "--batch-size", "8", "--max-length", "32"),
        ]
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    model = FlaxBertForSequenceClassification.from_pretrained(model_path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    loaded = {task: cdvft_jax.load_adapter(folder, model) for task, folder in folders.items()}
    head = {p: v for p, v in flat_params(loaded["sst2"][1]).items() if not loaded["sst2"][0].is_adapter_leaf(p)}
    base_params = unflat_params({**flat_params(model.params), **head})
    for row, record in zip(rows, written, strict=True):
        inputs = {k: jnp.asarray(v) for k, v in tokenizer(row["text"], return_tensors="np").items()}
        task = row["adapter"]
        if task is None:
            logits = model(**inputs, params=base_params).logits
        else:
            logits = loaded[task][0](**inputs, params=loaded[task][1]).logits
        np.testing.assert_allclose(record["scores"], np.asarray(jax.nn.softmax(logits[0])), rtol=0, atol=1e-5)
    # The two tasks' adapters give different scores to the same sentence.
    assert abs(written[0]["scores"][0] - written[1]["scores"][0]) > 1e-3


def test_an_image_model_scores_image_files_relative_to_the_input(tmp_path):
    from PIL import Image
    from transformers import FlaxViTForImageClassification, ViTConfig

    from train.image import center_crop, normalisation, to_pixels

    base = tmp_path / "vit"
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    FlaxViTForImageClassification(config, seed=0).save_pretrained(base)
    model = FlaxViTForImageClassification.from_pretrained(base, num_labels=3, ignore_mismatched_sizes=True)
    adapted = cdvft_jax.inject(model, cdvft_jax.LoRAConfig(rank=4, modules_to_save=["classifier"]))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    folders = {}
    for seed, name in enumerate(("x", "y"), 1):
        params = merge_params(trained_like(trainable, seed), frozen)
        folders[name] = cdvft_jax.save_adapter(tmp_path / name, adapted, params)
    (tmp_path / "data" / "pics").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "data" / "pics" / f"{i}.png")
    rows = [{"adapter": a, "image": f"pics/{i}.png"} for i in range(3) for a in ("x", "y")]
    write_rows(tmp_path / "data" / "rows.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    argv = ["--model", str(base), "--adapters", *(f"{n}={f}" for n, f in folders.items()), "--num-labels", "3"]
    infer.main([*argv, "--input", str(tmp_path / "data" / "rows.jsonl"), "--output", str(out), "--batch-size", "4"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    statistics = normalisation(str(base))
    for row, record in zip(rows, written, strict=True):
        picture = center_crop(Image.open(tmp_path / "data" / row["image"]).convert("RGB"), 16)
        adapter_model, params = cdvft_jax.load_adapter(folders[row["adapter"]], model)
        logits = adapter_model(pixel_values=jnp.asarray(to_pixels([picture], *statistics)), params=params).logits
        np.testing.assert_allclose(record["scores"], np.asarray(jax.nn.softmax(logits[0])), rtol=0, atol=1e-5)
    assert np.abs(np.subtract(written[0]["scores"], written[1]["scores"])).max() > 1e-3  # x and y differ
    write_rows(tmp_path / "data" / "rows.jsonl", [{"adapter": "x", "image": "pics/missing.png"}])
    with pytest.raises(SystemExit, match=r"rows\.jsonl:1: image .*pics/missing\.png is not a file"):
        infer.main([*argv, "--input", str(tmp_path / "data" / "rows.jsonl"), "--output", str(out)])
