"""rmjax.rl."""
