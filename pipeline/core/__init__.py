"""What every stage and the CLI share: typed configuration, expected errors, registries, small helpers."""
