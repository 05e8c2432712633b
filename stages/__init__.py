"""DVC entry points: each parses params.yaml, calls the library, and writes its outputs."""
