"""The measured ceilings (seal_jax.ceilings): what each measuring program does, counted in its compiled HLO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from seal_jax import hlo
from seal_jax.ceilings import read_program


@pytest.mark.parametrize("passes", [1, 8])
def test_the_read_program_reads_its_array_once_a_pass(passes):
    """The bandwidth is ``passes × size / time``: the program must read the array exactly that often (a loop
    body that XLA hoisted out of the loop would read it once)."""
    x = jax.ShapeDtypeStruct((1 << 18,), jnp.float32)  # 1 MB
    stats = hlo.analyze(read_program(passes).lower(x).compile().as_text())
    assert stats.bytes == pytest.approx(passes * x.size * 4, rel=0.02)
    got = read_program(passes)(jnp.ones(8, jnp.float32))
    assert float(got) == sum(8 * (1 + i) for i in range(passes))  # each pass sums x + i

