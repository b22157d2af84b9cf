"""Data, in the order it flows: raw data (`shapes/`, `folder`) -> token sets on disk (`tokens/`) ->
the objectives' transforms (`fourm/`, `sequences/`) -> the input pipeline (`pipeline/`)."""
