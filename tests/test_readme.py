"""The README's library example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_trains_and_merges():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert np.isfinite(float(namespace["metrics"]["loss"]))
    summary = namespace["adapted"].summary(namespace["params"])
    assert summary.adapter == 55_296
    # The merged model on the unmodified model reproduces the adapted model after the step.
    adapted, merge_params = namespace["adapted"], namespace["cdvft_jax"].merge_params
    trained = merge_params(namespace["state"].trainable, namespace["frozen"])
    expected = adapted(namespace["batch"]["input_ids"], params=trained).logits
    np.testing.assert_allclose(namespace["logits"], expected, rtol=1e-4, atol=1e-5)


def test_readme_decoder_example_generates_and_exports(tmp_path, monkeypatch):
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "generate" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    np.testing.assert_array_equal(namespace["tokens"], namespace["same_tokens"])
    assert namespace["tokens"].shape == (1, 4 + 8)
    assert {p.name for p in (tmp_path / "llama-merged").iterdir()} == {"config.json", "model.safetensors"}
