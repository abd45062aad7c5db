"""Attention: plain-jnp references and the backend dispatch used by the model."""
