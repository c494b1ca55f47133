"""rmjax.eval."""
