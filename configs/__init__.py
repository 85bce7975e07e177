"""Experiment configs: one file per experiment, each with ``get_config()``.

Variants import the base config they change (``ssd300_voc``) and override fields, so every default
lives in exactly one place.
"""
