"""Studies: pipelines of cached stages."""
