"""rmjax.train."""
