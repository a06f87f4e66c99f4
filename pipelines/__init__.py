"""Floor 4: task presets, the click CLI, local and dask runners, the embedded demo data and the report."""
