"""The shipped configs and encoder go into the wheel as package data (pipelines/shipped/), so an
installed ssl-prune runs `ssl-prune run demo` from any directory; everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("configs", "models")  # top-level folders of the checkout, copied whole


class BuildWithShipped(build_py):
    def run(self):
        super().run()
        for folder in SHIPPED:
            self.copy_tree(folder, os.path.join(self.build_lib, "pipelines", "shipped", folder))


setup(cmdclass={"build_py": BuildWithShipped})
