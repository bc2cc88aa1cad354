"""Unit tests of the sans-IO core. `coresim` is importable through pytest's `pythonpath`
(pyproject.toml)."""
