"""Packaging for messenger: one module and its schema (the metadata is in pyproject.toml)."""

from setuptools import setup

setup(
    py_modules=["messenger"],
    # A top-level module cannot carry package data: the schema goes to
    # <prefix>/share/messenger/, where messenger.py looks for it.
    data_files=[("share/messenger", ["schema.sql"])],
)
