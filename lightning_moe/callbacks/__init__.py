"""Callbacks usable in any Lightning project (one class per file), re-exported here.

``class_path: lightning_moe.callbacks.<Name>`` works in YAML after ``pip install``.
"""

__all__: list[str] = []
