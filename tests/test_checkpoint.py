"""Orbax save/restore of adapter stacks and pytrees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax.lm.checkpoint import restore_pytree, save_pytree
from seal_jax.lm.lora import Adapters, LoraSpec


def test_adapters_round_trip(tmp_path):
    key = jax.random.PRNGKey(0)
    weights = {"q_proj": {"a": jax.random.normal(key, (2, 3, 8, 4)), "b": jax.random.normal(key, (2, 3, 4, 8))}}
    specs = (LoraSpec(rank=4, alpha=8.0), LoraSpec(rank=2, alpha=1.0, dropout=0.1, targets=("q_proj",)))
    ads = Adapters(weights, specs, losses=[[1.5, 1.0], [2.0]], failed=[None, "non-finite loss"])
    ads.save(tmp_path / "ads")
    back = Adapters.load(tmp_path / "ads")
    assert back.specs == specs and back.losses == ads.losses and back.failed == ads.failed
    for x, y in zip(jax.tree.leaves(back.weights), jax.tree.leaves(ads.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not back.single and back.base_model is None
    # one adapter taken out of a stack stays one adapter (generate and logits answer without the K axis),
    # and the model it was trained on is kept for save_peft
    ads.base_model = "/models/base"
    ads[1].save(tmp_path / "one")
    one = Adapters.load(tmp_path / "one")
    assert one.single and len(one) == 1 and one.specs == (specs[1],) and one.base_model == "/models/base"


def test_pytree_round_trip_and_overwrite(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7)}
    save_pytree(tmp_path / "t", tree)
    save_pytree(tmp_path / "t", {"w": tree["w"] * 2, "step": jnp.int32(8)})
    back = restore_pytree(tmp_path / "t")
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(tree["w"]) * 2)
    assert int(back["step"]) == 8


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_pytree(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not a saved adapter stack"):
        Adapters.load(tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from seal_jax.lm.checkpoint import CheckpointError

    weights = {"q_proj": {"a": jnp.ones((1, 2, 4, 2)), "b": jnp.ones((1, 2, 2, 4))}}
    Adapters(weights, (LoraSpec(rank=2, alpha=2.0),)).save(tmp_path / "ads")
    damaged = 0
    for f in (tmp_path / "ads" / "weights").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 4)
            damaged += 1
    assert damaged
    with pytest.raises(CheckpointError, match="corrupt or unreadable.*delete it and save again"):
        Adapters.load(tmp_path / "ads")
    (tmp_path / "ads" / "adapters.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapters.json is corrupt"):
        Adapters.load(tmp_path / "ads")
