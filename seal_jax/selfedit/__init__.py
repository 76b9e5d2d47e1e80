"""seal_jax.selfedit: the self-edit research loop; it uses the engine only through `seal_jax.lm.LM`."""
