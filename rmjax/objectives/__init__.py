"""rmjax.objectives."""
