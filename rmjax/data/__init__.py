"""rmjax.data."""
