"""Packaging for messenger: one module, its schema, and a console script."""

import re

from setuptools import setup

with open("messenger.py", encoding="utf-8") as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="messenger",
    version=version,
    description="A complete messenger backend in one readable Python file: Bottle, waitress, SQLite.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    py_modules=["messenger"],
    # A top-level module cannot carry package data: the schema goes to
    # <prefix>/share/messenger/, where messenger.py looks for it.
    data_files=[("share/messenger", ["schema.sql"])],
    python_requires=">=3.9",
    # messenger stops waitress through private parts (messenger._WaitressInternals;
    # a test says if they move): a new major version is let in only once checked.
    install_requires=["bottle>=0.13.4", "waitress>=3.0.2,<4"],
    extras_require={"test": ["pytest", "webtest"]},
    entry_points={"console_scripts": ["messenger = messenger:main"]},
)
