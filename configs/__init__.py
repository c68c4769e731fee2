"""Configs: plain Python files, each with a ``get_config()``."""
