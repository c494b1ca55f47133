"""rmjax.parallel."""
