"""Mesh training: specs, placement, sharded steps equal to one device, resharded resume, errors.

The multi-device checks need 8 CPU devices, which XLA only creates when
``XLA_FLAGS`` is set before jax is imported, and pytest has imported jax
already.  So this file is also a script: run as ``__main__`` under
``--xla_force_host_platform_device_count=8`` it runs every mesh check in one
subprocess and prints ``{check: "ok" | traceback}``; the tests below assert
on that.  Run with ``--process ID`` it is one of two processes of 4 CPU
devices each (``jax.distributed``, Gloo collectives), checking which batch rows
each process places.  The rest runs in-process on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cdvft_jax import sharding

TESTS = Path(__file__).resolve().parent
MARKER = "SHARDING-RESULTS:"
MESHES = ("data=8", "data=2,fsdp=4", "fsdp=8")
MIN_SIZE = 1024  # the tiny RoBERTa's kernels hold 1024-2048 elements, its biases 32-99


# ---------------------------------------------------------------------------
# The 8-device worker (runs as __main__ in a subprocess).


def _worker() -> dict[str, str]:
    import shutil
    import tempfile

    import optax

    import cdvft_jax
    from cdvft_jax import TrainingCheckpointer
    from cdvft_jax.params import flat_params

    sys.path.insert(0, str(TESTS))
    from conftest import make_inputs, make_model

    assert jax.device_count() == 8, jax.devices()
    results: dict[str, str] = {}

    def check(fn: Callable[[], None]) -> None:
        try:
            fn()
            results[fn.__name__] = "ok"
        except Exception:
            results[fn.__name__] = traceback.format_exc()

    model = make_model("roberta")
    adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(modules_to_save=["classifier"]))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    inputs, labels = make_inputs("roberta", batch=8)
    host_batch = jax.tree.map(np.asarray, (inputs, labels))
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-2, head_learning_rate=1e-2)

    def loss_fn(params, batch, rng):
        inputs, labels = batch
        logits = adapted(**inputs, params=params).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def close(actual, desired, scaled_atol: float = 1e-6) -> None:
        # Relative to each leaf's own scale: Adam's second moments are ~1e-7, below any fixed atol.
        def leaf_close(a, d):
            d = np.asarray(d)
            atol = scaled_atol * float(np.abs(d).max(initial=0.0))
            np.testing.assert_allclose(np.asarray(a), d, rtol=1e-5, atol=atol)

        jax.tree.map(leaf_close, actual, desired)

    # The single-device reference: 5 steps of the plain make_train_step.
    ref_step = cdvft_jax.make_train_step(loss_fn, optimizer)
    ref_state = cdvft_jax.init_train_state(trainable, optimizer)
    ref_losses = []
    for k in range(5):
        ref_state, metrics = ref_step(ref_state, frozen, host_batch, jax.random.key(k))
        ref_losses.append(float(metrics["loss"]))

    def sharded_setup(spec: str):
        mesh = sharding.make_mesh(sharding.parse_mesh(spec))
        frozen_sharded = sharding.shard_params(
            frozen, sharding.frozen_partition_specs(frozen, mesh, min_size=MIN_SIZE), mesh
        )
        state_shardings = sharding.state_shardings_for(cdvft_jax.init_train_state(trainable, optimizer), mesh)
        step = sharding.make_sharded_train_step(
            loss_fn,
            optimizer,
            mesh,
            state_shardings,
            sharding.shardings_of(frozen_sharded),
            NamedSharding(mesh, sharding.batch_spec()),
        )
        return mesh, frozen_sharded, state_shardings, step

    checkpoint_dir = tempfile.mkdtemp()
    rng = jax.random.key(42)
    final_states = {}
    for spec in MESHES:
        mesh, frozen_sharded, state_shardings, step = sharded_setup(spec)
        state = jax.device_put(cdvft_jax.init_train_state(trainable, optimizer), state_shardings)
        batch = sharding.shard_batch(host_batch, mesh)
        losses = []
        for k in range(5):
            state, metrics = step(state, frozen_sharded, batch, jax.random.key(k))
            losses.append(float(metrics["loss"]))
            if spec == "data=2,fsdp=4" and k == 2:
                with TrainingCheckpointer(checkpoint_dir, save_every=100) as checkpointer:
                    checkpointer.maybe_save(3, state, rng, {"batch": 3}, force=True)
        final_states[spec] = state

        def sharded_step_matches_single_device(losses=losses, state=state, mesh=mesh):
            np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
            close(state.trainable, ref_state.trainable)
            close(state.opt_state, ref_state.opt_state)
            assert int(state.step) == 5
            for leaf in jax.tree.leaves(state):
                assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), leaf.ndim), leaf.sharding

        sharded_step_matches_single_device.__name__ += f"[{spec}]"
        check(sharded_step_matches_single_device)

        def batch_is_split_over_every_device(batch=batch, mesh=mesh):
            for leaf in jax.tree.leaves(batch):
                assert leaf.sharding.spec == sharding.batch_spec()
                assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}
                assert {s.data.shape[1:] for s in leaf.addressable_shards} == {leaf.shape[1:]}

        batch_is_split_over_every_device.__name__ += f"[{spec}]"
        check(batch_is_split_over_every_device)

        def frozen_kernels_are_split(frozen_sharded=frozen_sharded, mesh=mesh):
            fsdp = mesh.shape["fsdp"]
            per_device = dict.fromkeys(mesh.devices.flat, 0)
            expected_bytes = total_bytes = 0
            split = 0
            for path, leaf in flat_params(frozen_sharded).items():
                total_bytes += leaf.nbytes
                for shard in leaf.addressable_shards:
                    per_device[shard.device] += shard.data.nbytes
                spec = leaf.sharding.spec
                if leaf.ndim == 1:  # biases and LayerNorm
                    assert spec == P(), (path, spec)
                if "fsdp" in spec:
                    split += 1
                    dim = list(spec).index("fsdp")
                    assert leaf.shape[dim] == max(s for s in leaf.shape if s % fsdp == 0), (path, spec)
                    shard_shape = list(leaf.shape)
                    shard_shape[dim] //= fsdp
                    expected_bytes += leaf.nbytes // fsdp
                else:
                    shard_shape = list(leaf.shape)
                    expected_bytes += leaf.nbytes
                assert {tuple(s.data.shape) for s in leaf.addressable_shards} == {tuple(shard_shape)}, path
            flat = flat_params(frozen_sharded)
            if fsdp > 1:
                # Every kernel: (32, 32) along dim 0, (32, 64) along dim 1, (64, 32) along dim 0.
                layer = "roberta/encoder/layer/0/"
                assert flat[layer + "attention/self/query/kernel"].sharding.spec == P("fsdp")
                assert flat[layer + "intermediate/dense/kernel"].sharding.spec == P(None, "fsdp")
                assert flat[layer + "output/dense/kernel"].sharding.spec == P("fsdp")
                # 99 is divisible by neither 4 nor 8: the embedding splits along its hidden dim.
                assert flat["roberta/embeddings/word_embeddings/embedding"].sharding.spec == P(None, "fsdp")
                assert split >= 12 and expected_bytes < total_bytes / 2, (split, expected_bytes, total_bytes)
            else:
                assert split == 0 and expected_bytes == total_bytes
            assert set(per_device.values()) == {expected_bytes}, (per_device, expected_bytes)

        frozen_kernels_are_split.__name__ += f"[{spec}]"
        check(frozen_kernels_are_split)

    def resume_on_other_meshes_matches_uninterrupted_run():
        reference = final_states["data=2,fsdp=4"]
        # Onto data=4,fsdp=2: the template's replicated shardings on the new mesh.
        mesh, frozen_sharded, state_shardings, step = sharded_setup("data=4,fsdp=2")
        template = jax.device_put(cdvft_jax.init_train_state(trainable, optimizer), state_shardings)
        with TrainingCheckpointer(checkpoint_dir, save_every=100) as checkpointer:
            state, restored_rng, position = checkpointer.restore_latest(template, jax.random.key(0))
        assert position == {"batch": 3} and int(state.step) == 3
        np.testing.assert_array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))
        for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings), strict=True):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), leaf.sharding
        batch = sharding.shard_batch(host_batch, mesh)
        for k in (3, 4):
            state, _ = step(state, frozen_sharded, batch, jax.random.key(k))
        close(state, reference)

        # Onto one device, continued with the plain step.
        template = cdvft_jax.init_train_state(trainable, optimizer)
        with TrainingCheckpointer(checkpoint_dir, save_every=100) as checkpointer:
            state, _, _ = checkpointer.restore_latest(template, jax.random.key(0))
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.device_set == {jax.devices()[0]}, leaf.sharding
        for k in (3, 4):
            state, _ = ref_step(state, frozen, host_batch, jax.random.key(k))
        close(state, reference)
        close(state, ref_state)

    check(resume_on_other_meshes_matches_uninterrupted_run)

    def errors_name_the_sizes():
        mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
        for size in (6, 4):
            bad = jax.tree.map(lambda x, size=size: x[:size], host_batch)
            with pytest.raises(ValueError, match=rf"batch size {size} is not divisible .* = 8"):
                sharding.shard_batch(bad, mesh)
            with pytest.raises(ValueError, match=rf"batch size {size} is not divisible .* = 8"):
                sharding.global_batch_from_local(bad, mesh)
        for axes in ({"data": 3}, {"data": 2, "fsdp": 2}, {"data": 16}, {"fsdp": 3, "data": 3}):
            with pytest.raises(ValueError, match=r"jax.device_count\(\) = 8"):
                sharding.make_mesh(axes)
        with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
            sharding.make_mesh({"data": 4, "model": 2})
        with pytest.raises(ValueError, match="must be positive"):
            sharding.make_mesh({"data": -8, "fsdp": -1})
        assert sharding.parse_mesh(None) == {"data": 8, "fsdp": 1}
        assert dict(sharding.make_mesh(sharding.parse_mesh(None)).shape) == {"data": 8, "fsdp": 1}

    check(errors_name_the_sizes)

    def baselines_with_dropout_on_fsdp_match_one_device():
        """LoRA with dropout, VeRA (frozen shared projections) and C3A train the same on data=2,fsdp=4 as on
        one device: the dropout masks come from the same keys whatever the sharding."""
        mesh = sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=4"))
        for config in (
            cdvft_jax.LoRAConfig(rank=4, dropout=0.1, modules_to_save=["classifier"]),
            cdvft_jax.VeRAConfig(rank=8, dropout=0.1, modules_to_save=["classifier"]),
            cdvft_jax.C3AConfig(block_size=8, modules_to_save=["classifier"]),
        ):
            method_adapted = cdvft_jax.inject(model, config)
            method_trainable, method_frozen = method_adapted.split(method_adapted.init(jax.random.key(0), model.params))
            method_optimizer = cdvft_jax.adapter_optimizer(
                method_adapted, adapter_learning_rate=1e-2, head_learning_rate=1e-2
            )

            def dropout_loss(params, batch, rng, method_adapted=method_adapted):
                inputs, labels = batch
                logits = method_adapted(**inputs, params=params, train=True, dropout_rng=rng).logits
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            one_step = cdvft_jax.make_train_step(dropout_loss, method_optimizer)
            one_state = cdvft_jax.init_train_state(method_trainable, method_optimizer)
            # The programs' one helper: placement and the step together.
            mesh_state, frozen_sharded, mesh_step = sharding.shard_training(
                dropout_loss,
                method_optimizer,
                cdvft_jax.init_train_state(method_trainable, method_optimizer),
                method_frozen,
                mesh,
                min_size=MIN_SIZE,
            )
            batch = sharding.shard_batch(host_batch, mesh)
            for k in range(3):
                one_state, one_metrics = one_step(one_state, method_frozen, host_batch, jax.random.key(k))
                mesh_state, mesh_metrics = mesh_step(mesh_state, frozen_sharded, batch, jax.random.key(k))
                np.testing.assert_allclose(float(mesh_metrics["loss"]), float(one_metrics["loss"]), rtol=1e-5)
            assert any(  # the frozen base really is split over fsdp
                not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(frozen_sharded)
            )
            # Sharded reductions sum in another order, and Adam's g / sqrt(v) passes those last-bit
            # differences on in full for near-zero gradients: measured 6.4e-8 at leaf scales <= 0.064.
            close(mesh_state.trainable, one_state.trainable, scaled_atol=1e-5)
            moved = [
                np.abs(np.asarray(a) - np.asarray(b)).max()
                for a, b in zip(jax.tree.leaves(one_state.trainable), jax.tree.leaves(method_trainable), strict=True)
            ]
            assert min(moved) > 1e-4, config.method  # every trainable leaf moved

    check(baselines_with_dropout_on_fsdp_match_one_device)

    def decoders_all_linear_on_fsdp_match_one_device():
        """CDVFT on every linear layer of a tiny Llama (GQA: non-square k/v) and GPT-2 (FlaxConv1D kernels
        stored (out, in)) trains the same on fsdp=8 as on one device, with the frozen base split."""
        from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM, GPT2Config, LlamaConfig

        mesh = sharding.make_mesh(sharding.parse_mesh("fsdp=8"))
        decoders = (
            FlaxLlamaForCausalLM(
                LlamaConfig(
                    vocab_size=64,
                    hidden_size=32,
                    intermediate_size=48,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                ),
                seed=0,
            ),
            FlaxGPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32), seed=0),
        )
        ids = np.random.default_rng(0).integers(1, 64, (8, 12)).astype(np.int32)
        for decoder in decoders:
            decoder_adapted = cdvft_jax.inject(decoder, cdvft_jax.CDVFTConfig(target_modules=cdvft_jax.ALL_LINEAR))
            decoder_trainable, decoder_frozen = decoder_adapted.split(
                decoder_adapted.init(jax.random.key(0), decoder.params)
            )
            # Plain SGD: the update is linear in the gradient, so the sharded sums' last-bit differences stay
            # last-bit in the params (Adam's g / sqrt(v) blows them up for near-zero gradients, see above).
            decoder_optimizer = optax.sgd(0.5)

            def lm_loss(params, batch, rng, decoder_adapted=decoder_adapted):
                logits = decoder_adapted(batch, params=params).logits[:, :-1]
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

            one_step = cdvft_jax.make_train_step(lm_loss, decoder_optimizer)
            one_state = cdvft_jax.init_train_state(decoder_trainable, decoder_optimizer)
            mesh_state, frozen_sharded, mesh_step = sharding.shard_training(
                lm_loss,
                decoder_optimizer,
                cdvft_jax.init_train_state(decoder_trainable, decoder_optimizer),
                decoder_frozen,
                mesh,
                min_size=MIN_SIZE,
            )
            batch = sharding.shard_batch(ids, mesh)
            for k in range(3):
                one_state, one_metrics = one_step(one_state, decoder_frozen, ids, jax.random.key(k))
                mesh_state, mesh_metrics = mesh_step(mesh_state, frozen_sharded, batch, jax.random.key(k))
                np.testing.assert_allclose(float(mesh_metrics["loss"]), float(one_metrics["loss"]), rtol=1e-5)
            assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(frozen_sharded))
            close(mesh_state.trainable, one_state.trainable)
            assert float(one_metrics["loss"]) < float(
                lm_loss(cdvft_jax.merge_params(decoder_trainable, decoder_frozen), ids, None)
            )

    check(decoders_all_linear_on_fsdp_match_one_device)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return results


WORKER_CHECKS = [
    *(
        f"{name}[{spec}]"
        for name in (
            "sharded_step_matches_single_device",
            "batch_is_split_over_every_device",
            "frozen_kernels_are_split",
        )
        for spec in MESHES
    ),
    "resume_on_other_meshes_matches_uninterrupted_run",
    "errors_name_the_sizes",
    "baselines_with_dropout_on_fsdp_match_one_device",
    "decoders_all_linear_on_fsdp_match_one_device",
]


@pytest.fixture(scope="module")
def worker_results() -> dict[str, str]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert proc.returncode == 0 and lines, f"worker failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len(MARKER) :])


@pytest.mark.parametrize("name", WORKER_CHECKS)
def test_on_eight_devices(worker_results: dict[str, str], name: str) -> None:
    assert worker_results.get(name) == "ok", worker_results.get(name, f"check {name} did not run")


# ---------------------------------------------------------------------------
# In-process, one device.


def test_parse_mesh() -> None:
    assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh(" fsdp = 8 ") == {"data": 1, "fsdp": 8}
    assert sharding.parse_mesh(None) == sharding.parse_mesh("") == {"data": jax.device_count(), "fsdp": 1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model=2", r"unknown axis 'model'"),
        ("data=0", r"must be positive, got \{'data': 0\}"),
        ("data=-2,fsdp=4", r"must be positive"),
        ("data=two", r"'axis=size' entries, got 'data=two'"),
        ("data", r"'axis=size' entries, got 'data'"),
        ("data=2,data=2", r"axis 'data' is given twice"),
    ],
)
def test_parse_mesh_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"mesh '{spec}'.*{message}"):
        sharding.parse_mesh(spec)


def test_make_mesh_on_one_device() -> None:
    mesh = sharding.make_mesh(sharding.parse_mesh(None))
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert dict(sharding.make_mesh({"fsdp": 1}, devices=jax.devices()).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match=r"has 2 devices, but jax.device_count\(\) = 1"):
        sharding.make_mesh({"data": 2})
    with pytest.raises(ValueError, match=r"but len\(devices\) = 1"):
        sharding.make_mesh({"fsdp": 4}, devices=jax.devices())
    with pytest.raises(ValueError, match=r"unknown axes \['tensor'\]"):
        sharding.make_mesh({"tensor": 1})


def _shapes(**shapes: tuple[int, ...]) -> dict:
    return {name: jax.ShapeDtypeStruct(shape, np.float32) for name, shape in shapes.items()}


def test_frozen_partition_specs_rules() -> None:
    frozen = {
        "layer": _shapes(kernel=(256, 512), bias=(512,), scale=(40000,)),
        "square": _shapes(kernel=(256, 256)),
        "embed": _shapes(embedding=(50001, 768)),
        "odd": _shapes(kernel=(257, 129)),
        "small": _shapes(kernel=(64, 64)),
        "conv": _shapes(kernel=(3, 3, 64, 128)),
    }
    specs = sharding.frozen_partition_specs(frozen, AbstractMesh((2, 4), ("data", "fsdp")))
    assert specs == {
        "layer": {"kernel": P(None, "fsdp"), "bias": P(), "scale": P()},  # the largest divisible dim; 1-D stays
        "square": {"kernel": P("fsdp")},  # a tie goes to dim 0
        "embed": {"embedding": P(None, "fsdp")},  # 50001 is not divisible: the next largest dim
        "odd": {"kernel": P()},  # no divisible dim
        "small": {"kernel": P()},  # 4096 < min_size
        "conv": {"kernel": P(None, None, None, "fsdp")},
    }
    assert sharding.frozen_partition_specs(frozen, AbstractMesh((2, 4), ("data", "fsdp")), min_size=4096)["small"] == {
        "kernel": P("fsdp")
    }
    # Without an fsdp axis everything is replicated.
    replicated = sharding.frozen_partition_specs(frozen, AbstractMesh((8, 1), ("data", "fsdp")))
    assert set(jax.tree.leaves(replicated, is_leaf=lambda x: isinstance(x, P))) == {P()}


def test_frozen_partition_specs_overrides_come_first() -> None:
    frozen = {"embed": _shapes(embedding=(50000, 768)), "layer": _shapes(kernel=(256, 512), bias=(512,))}
    overrides = [
        (r"embed/.*", P("fsdp", None)),
        (r".*kernel", P()),
        (r"layer/kernel", P("fsdp")),  # shadowed by the previous pattern
        (r"bias", P("fsdp")),  # a full match is needed: "layer/bias" does not match
    ]
    specs = sharding.frozen_partition_specs(frozen, AbstractMesh((1, 8), ("data", "fsdp")), overrides=overrides)
    assert specs == {"embed": {"embedding": P("fsdp", None)}, "layer": {"kernel": P(), "bias": P()}}


def test_trainable_specs_batch_spec_and_state_shardings() -> None:
    import optax

    from cdvft_jax import init_train_state

    trainable = {"a": {"cdv_a_in": np.ones((4, 8), np.float32)}, "head": {"kernel": np.ones((8, 3), np.float32)}}
    assert sharding.trainable_partition_specs(trainable) == {"a": {"cdv_a_in": P()}, "head": {"kernel": P()}}
    assert sharding.batch_spec() == P(("data", "fsdp"))
    mesh = sharding.make_mesh({"data": 1})
    state = init_train_state(trainable, optax.adam(1e-3))
    shardings = sharding.state_shardings_for(state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    assert set(jax.tree.leaves(shardings)) == {NamedSharding(mesh, P())}
    placed = sharding.shard_params(trainable, sharding.trainable_partition_specs(trainable), mesh)
    replicated = NamedSharding(mesh, P())
    assert sharding.shardings_of(placed) == {"a": {"cdv_a_in": replicated}, "head": {"kernel": replicated}}


def test_batches_on_one_process() -> None:
    mesh = sharding.make_mesh({"data": 1})
    batch = {"ids": np.arange(12).reshape(3, 4), "labels": np.arange(3)}
    placed, local = sharding.shard_batch(batch, mesh), sharding.global_batch_from_local(batch, mesh)
    batch_sharding = NamedSharding(mesh, sharding.batch_spec())
    # One process holds every row: local_rows is the batch itself.
    assert sharding.process_batch_slice(3, mesh) == slice(0, 3)
    rows = sharding.global_batch_from_local(sharding.local_rows(batch, mesh), mesh)
    for tree in (placed, local, rows):
        assert sharding.shardings_of(tree) == {"ids": batch_sharding, "labels": batch_sharding}
        jax.tree.map(np.testing.assert_array_equal, tree, batch)
    with pytest.raises(ValueError, match=r"disagree on the batch size: \[2, 3\]"):
        sharding.shard_batch({"a": np.zeros((3, 1)), "b": np.zeros(2)}, mesh)
    with pytest.raises(ValueError, match="no scalars"):
        sharding.shard_batch({"a": np.zeros(3), "step": np.int32(1)}, mesh)


_LAUNCHER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.mark.parametrize(
    ("env", "coordinator", "wanted"),
    [
        ({}, None, False),
        ({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1", "TPU_WORKER_HOSTNAMES": "localhost"}, None, False),
        ({}, "10.0.0.1:1234", True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, None, True),
        ({"SLURM_NTASKS": "4"}, None, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, None, True),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, None, True),
    ],
)
def test_maybe_initialize_distributed(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], coordinator: str | None, wanted: bool
) -> None:
    for var in _LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    calls = []
    # The real initialize would wait for the other processes.
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert sharding.maybe_initialize_distributed(coordinator) is wanted
    assert calls == ([{"coordinator_address": coordinator}] if wanted else [])


def test_maybe_initialize_distributed_passes_the_process_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    # JAX_COORDINATOR_ADDRESS (read by jax.distributed.initialize itself) plus the count and index.
    assert sharding.maybe_initialize_distributed(num_processes=2, process_id=1)
    assert sharding.maybe_initialize_distributed("h:1", 4, 0)
    assert calls == [
        {"coordinator_address": None, "num_processes": 2, "process_id": 1},
        {"coordinator_address": "h:1", "num_processes": 4, "process_id": 0},
    ]


# ---------------------------------------------------------------------------
# Two processes x 4 CPU devices (each runs this file with --process PROCESS_ID).


def _process_worker(process_id: int) -> dict[str, str]:
    """Batch rows and placement on a 2-process mesh; the coordinator is in ``JAX_COORDINATOR_ADDRESS``."""
    assert sharding.maybe_initialize_distributed(num_processes=2, process_id=process_id)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4), jax.devices()
    assert sharding.is_main_process() == (process_id == 0)  # one writer per run
    results: dict[str, str] = {}
    batch = {"ids": np.arange(16 * 3).reshape(16, 3), "labels": np.arange(16) % 5}

    for spec in ("data=2,fsdp=4", "fsdp=8", "data=8"):
        mesh = sharding.make_mesh(sharding.parse_mesh(spec))
        try:
            assert sharding.process_batch_slice(16, mesh) == slice(8 * process_id, 8 * process_id + 8)
            local = sharding.local_rows(batch, mesh)
            np.testing.assert_array_equal(local["ids"], batch["ids"][8 * process_id : 8 * process_id + 8])
            placed = sharding.global_batch_from_local(local, mesh)
            assert placed["ids"].shape == (16, 3) and not placed["ids"].is_fully_addressable
            for shard in placed["ids"].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), batch["ids"][shard.index])
            # Gathered back: every process sees the whole global batch.
            gathered = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))(placed)
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, gathered), batch)
            results[f"local_rows_assemble_the_global_batch[{spec}]"] = "ok"
        except Exception:
            results[f"local_rows_assemble_the_global_batch[{spec}]"] = traceback.format_exc()

    try:
        # Devices of the two processes alternating along the batch axis: no process owns one block of rows.
        by_process = [[d for d in jax.devices() if d.process_index == i] for i in range(2)]
        interleaved = [d for pair in zip(*by_process, strict=True) for d in pair]
        mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, devices=interleaved)
        with pytest.raises(ValueError, match=rf"process {process_id} holds the batch rows .* not one contiguous"):
            sharding.process_batch_slice(16, mesh)
        with pytest.raises(ValueError, match="not one contiguous"):
            sharding.local_rows(batch, mesh)
        results["interleaved_devices_are_refused"] = "ok"
    except Exception:
        results["interleaved_devices_are_refused"] = traceback.format_exc()
    return results


PROCESS_CHECKS = [
    *(f"local_rows_assemble_the_global_batch[{spec}]" for spec in ("data=2,fsdp=4", "fsdp=8", "data=8")),
    "interleaved_devices_are_refused",
]


@pytest.fixture(scope="module")
def two_process_results() -> list[dict[str, str]]:
    from conftest import run_two_cpu_processes  # not at the top: the workers run this file without pytest

    runs = run_two_cpu_processes(lambda i: [sys.executable, __file__, "--process", str(i)], TESTS.parent, 120)
    results = []
    for code, output in runs:
        lines = [line for line in output.splitlines() if line.startswith(MARKER)]
        assert code == 0 and lines, f"process worker failed ({code}):\n{output}"
        results.append(json.loads(lines[-1][len(MARKER) :]))
    return results


@pytest.mark.parametrize("process", [0, 1])
@pytest.mark.parametrize("name", PROCESS_CHECKS)
def test_on_two_processes(two_process_results: list[dict[str, str]], process: int, name: str) -> None:
    result = two_process_results[process]
    assert result.get(name) == "ok", result.get(name, f"check {name} did not run")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--process"]:
        print(MARKER + json.dumps(_process_worker(int(sys.argv[2]))), flush=True)
    else:
        print(MARKER + json.dumps(_worker()), flush=True)
