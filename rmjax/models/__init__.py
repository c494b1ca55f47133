"""rmjax.models."""
