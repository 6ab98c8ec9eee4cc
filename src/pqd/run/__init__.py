"""A run: the resolved config, the pipeline, the run folder and the loader of finished runs, metrics."""
