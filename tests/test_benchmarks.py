"""The benchmark suite (``python -m benchmarks``) on tiny models: its JSON interface and its checks."""

import json

import pytest

from benchmarks import __main__ as suite
from benchmarks import params
from benchmarks.common import METHODS, MODELS

TRAIN_STEP_KEYS = {
    "model": str,
    "method": str,
    "ms_per_step": float,
    "ms_min": float,
    "ms_max": float,
    "ratio_to_floor": float,
    "tokens_per_s": float,
    "repeats": int,
    "trainable_params": int,
}
PARAMS_KEYS = {"model": str, "method": str, "trainable_params": int, "adapter_params": int}
FLOPS_KEYS = {"model": str, "method": str, "analytic": float, "xla": float}
OPERATOR_KEYS = {"d": int, "tokens": int, "direction": str, "op": str, "ms": float, "xla_flops": float}
TINY_D, TINY_LAYERS = 64, 2  # step_time's tiny models: hidden 64, 2 layers, query + value adapted


def check_rows(rows, keys):
    assert rows
    for row in rows:
        for key, kind in keys.items():
            assert isinstance(row[key], kind), (key, row)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two tiny suite runs: the train step and flops on two methods; params and operators on all."""
    folder = tmp_path_factory.mktemp("bench")
    step = ["--tiny", "--no-rss", "--batch", "2", "--seq-len", "16", "--methods", "floor,cdvft"]
    suite.main(["--json", str(folder / "step.json"), "--parts", "train_step,flops", *step])
    suite.main(["--json", str(folder / "rest.json"), "--tiny", "--parts", "params,operator"])
    return [json.loads((folder / name).read_text()) for name in ("step.json", "rest.json")]


def test_json_interface(results):
    for out in results:
        assert list(out) == ["machine", "train_step", "params", "flops", "operator", "accuracy"]
        assert out["accuracy"] == []  # opt-in: hours at full size
        assert out["machine"]["mode"] == "tiny" and out["machine"]["cores"] >= 1
    step, rest = results
    check_rows(step["train_step"], TRAIN_STEP_KEYS)
    expected = {(m, x) for m in MODELS for x in ("floor", "cdvft")}
    assert {(r["model"], r["method"]) for r in step["train_step"]} == expected
    assert all("peak_rss_mb" in r for r in step["train_step"])
    floor_ms = {r["model"]: r["ms_per_step"] for r in step["train_step"] if r["method"] == "floor"}
    for row in step["train_step"]:  # each ratio is the row's median over its own model's floor median
        assert row["ratio_to_floor"] == pytest.approx(row["ms_per_step"] / floor_ms[row["model"]], rel=1e-12)
    check_rows(step["flops"], FLOPS_KEYS)
    cdvft = [r for r in step["flops"] if r["method"] == "cdvft"]
    assert all(r["analytic"] > 0 and r["xla"] > 0 and r["xla_train_step"] > 0 for r in cdvft)
    check_rows(rest["params"], PARAMS_KEYS)
    assert {(r["model"], r["method"]) for r in rest["params"]} == {(m, x) for m in MODELS for x in METHODS}
    check_rows(rest["operator"], OPERATOR_KEYS)


def test_params_match_analytic_counts(results):
    rows = {(r["model"], r["method"]): r for r in results[1]["params"]}
    layers = 2 * TINY_LAYERS
    per_layer = {
        "cdvft": 3 * TINY_D,
        "lora": {"roberta-base": 8, "vit-base": 16},  # rank * (d_in + d_out)
        "vera": 256 + TINY_D,  # scaling vectors d (rank) and b (d_out)
        "fourierft": {"roberta-base": 1000, "vit-base": 3000},  # n spectral coefficients
        "c3a": TINY_D,  # one circulant block per square layer
    }
    for (model, method), row in rows.items():
        count = per_layer.get(method, 0)
        if method == "lora":
            count = count[model] * 2 * TINY_D
        elif isinstance(count, dict):
            count = count[model]
        assert row["adapter_params"] == row["analytic_adapter_params"] == layers * count, (model, method)
        if method != "full":
            assert row["trainable_params"] >= row["adapter_params"] + row["head_params"] > 0
    assert rows["roberta-base", "lora"]["adapter_ratio_to_cdvft"] == pytest.approx(16 / 3)
    assert rows["vit-base", "lora"]["adapter_ratio_to_cdvft"] == pytest.approx(32 / 3)


def test_full_size_params_ratio():
    """The paper's counts, on abstract shapes: CDVFT 55,296 vs LoRA 294,912 (r=8) and 589,824 (r=16)."""
    lora = {"roberta-base": (294_912, 5.33), "vit-base": (589_824, 10.67)}
    for model, (expected, ratio) in lora.items():
        rows = {r["method"]: r for r in params.param_rows(model, ["cdvft", "lora"])}
        assert rows["cdvft"]["adapter_params"] == 55_296
        assert rows["lora"]["adapter_params"] == expected
        assert round(rows["lora"]["adapter_ratio_to_cdvft"], 2) == ratio


def test_llama_2_7b_all_linear_counts_follow_the_per_layer_formulas():
    """Two layers of Llama-2-7B's widths (the count is per layer): CDVFT's square attention layers train 3 x 4096,
    its MLP layers 4096 + 11008 + 3 x 4096 (11008 padded to three blocks of 4096); LoRA r (d_in + d_out)."""
    rows = {r["method"]: r for r in params.llama_param_rows({**params.LLAMA_2_7B, "num_hidden_layers": 2})}
    d, mlp = 4096, 11008
    cdvft = 4 * 3 * d + 3 * (d + mlp + 3 * d)
    assert rows["cdvft"]["adapter_params"] == rows["cdvft"]["analytic_adapter_params"] == 2 * cdvft
    for rank in (8, 16):
        lora = 4 * rank * 2 * d + 3 * rank * (d + mlp)
        assert rows[f"lora r={rank}"]["adapter_params"] == 2 * lora
        assert rows[f"lora r={rank}"]["adapter_ratio_to_cdvft"] == pytest.approx(lora / cdvft)
    assert {r["adapted_layers"] for r in rows.values()} == {2 * 7}


def test_dense_operator_flops_are_two_t_d_d(results):
    dense = [r for r in results[1]["operator"] if r["op"] == "dense" and r["direction"] == "fwd"]
    assert dense
    for row in dense:
        assert row["xla_flops"] == 2 * row["tokens"] * row["d"] * row["d"]
    rows = results[1]["operator"]
    cdv = [r for r in rows if r["op"].startswith("cdv")]
    assert cdv
    for row in cdv:  # the ratios are to the dense, LoRA and one-block rows of the same size and direction
        same = {
            r["op"]: r["ms"]
            for r in rows
            if (r["d"], r["tokens"], r["direction"]) == (row["d"], row["tokens"], row["direction"])
        }
        assert row["ratio_to_dense"] == pytest.approx(row["ms"] / same["dense"], rel=1e-12)
        assert row["ratio_to_lora"] == pytest.approx(row["ms"] / same["lora"], rel=1e-12)
        assert row["ratio_to_one_block"] == pytest.approx(row["ms"] / same[f"cdv p={row['d']}"], rel=1e-12)
    assert any(row["block_size"] < row["d"] for row in cdv)  # --tiny times a multi-block circulant too


def test_accuracy_part_runs_the_accuracy_suite(tmp_path, tiny_model):
    out = suite.main(
        ["--json", str(tmp_path / "acc.json"), "--tiny", "--parts", "accuracy", "--accuracy-model", str(tiny_model)]
    )
    records = json.loads((tmp_path / "acc.accuracy.json").read_text())["runs"]
    assert out["accuracy"] == records
    assert sorted(r["method"] for r in records) == ["cdvft", "head"]
    for r in records:  # an accuracy over the scored dev examples is a whole number of them
        assert r["task"] == "sst2" and r["steps"] == 2
        assert float(r["metrics"]["accuracy"] * r["scored_examples"]).is_integer(), r


def test_many_adapters_rows_and_memory(tmp_path):
    from benchmarks import many_adapters

    argv = ["--tiny", "--counts", "1,4", "--batch", "8", "--seq-len", "8", "--repeats", "1"]
    out = many_adapters.main([*argv, "--json", str(tmp_path / "many.json")])
    assert json.loads((tmp_path / "many.json").read_text())["rows"] == out["rows"]
    for method in ("cdvft", "lora"):
        rows = [r for r in out["rows"] if r["method"] == method]
        single = next(r for r in rows if r["way"] == "single")
        assert sorted((r["adapters"], r["way"]) for r in rows if r["way"] != "single") == sorted(
            (n, way) for n in (1, 4) for way in many_adapters.WAYS
        )
        for r in rows:
            assert r["examples_per_second"] == pytest.approx(r["rows"] / r["seconds"], rel=1e-12)
            assert r["ratio_to_single"] == pytest.approx(r["examples_per_second"] * single["seconds"] / 8, rel=1e-12)
    # One more adapter at BERT-base's full shape (12 layers, query and value, d = 768, a 2-label head):
    head = 768 * 2 + 2
    assert out["memory"]["cdvft"] == {"adapter_bytes": 4 * 24 * 3 * 768, "with_head_bytes": 4 * (24 * 3 * 768 + head)}
    lora = 24 * 2 * 8 * 768
    assert out["memory"]["lora"] == {"adapter_bytes": 4 * lora, "with_head_bytes": 4 * (lora + head)}


def test_lowrank_export_errors_fall_with_the_rank_to_zero_at_full_rank(tmp_path):
    import jax
    from conftest import make_model, trained_like

    import cdvft_jax
    from benchmarks import lowrank_export

    base = tmp_path / "base"
    make_model("bert").save_pretrained(base)
    model = make_model("bert")
    adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(modules_to_save=["classifier"]))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    params = cdvft_jax.merge_params(trained_like(trainable, 1), frozen)
    folder = cdvft_jax.save_adapter(tmp_path / "adapter", adapted, params, base_model=str(base))
    out = lowrank_export.main(["--adapter", str(folder), "--num-labels", "3", "--ranks", "2,8,32"])
    assert len(out["layers"]) == 4  # 2 layers x query, value
    for layer in out["layers"].values():
        assert layer["full_rank"] == 32 and layer["numerical_rank"] == 32  # a random CDV update: full rank
        assert 1 > layer["error_at_rank_2"] > layer["error_at_rank_8"] > layer["error_at_rank_32"]
        assert layer["error_at_rank_32"] < 1e-6
        assert layer["rank_for_energy_0.9"] < layer["rank_for_energy_0.99"] <= 32


def test_decoder_step_benchmark_times_every_method_on_one_llama(tmp_path):
    from benchmarks import decoder_step

    out = tmp_path / "decoder.json"
    decoder_step.main(["--small", "--repeats", "1", "--warmup", "0", "--no-rss", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == list(decoder_step.METHODS)
    assert rows["floor"]["ratio_to_floor"] == 1.0 and rows["lora16"]["ratio_to_lora16"] == 1.0
    # Every method trains on the same model: the floor's one RMSNorm, the adapters on all 14 linear layers.
    assert rows["floor"]["trainable_params"] == decoder_step.SMALL["hidden_size"]
    assert rows["lora16"]["trainable_params"] == 2 * rows["lora8"]["trainable_params"]
    assert 0 < rows["cdvft"]["trainable_params"] < rows["lora8"]["trainable_params"]
    assert all(r["ms_per_step"] > 0 and r["xla_flops"] for r in rows.values())
    assert data["machine"]["dtype"] == "float32"
