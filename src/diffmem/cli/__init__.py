"""The command line, one module a command: ``list``, ``run`` and ``reproduce``
(:mod:`~diffmem.cli.experiments`), ``audit`` (:mod:`~diffmem.cli.audit`), ``detect``
(:mod:`~diffmem.cli.detect`), ``mitigate`` (:mod:`~diffmem.cli.mitigate`) and ``compare``
(:mod:`~diffmem.cli.compare`); the options several commands share are declared once in
:mod:`~diffmem.cli.options`, and what every command does the same way (a ``torchrun``
launch's process group, bad input as exit 2) is :mod:`~diffmem.cli.app`."""

# isort: off
# the commands, registered in the order --help lists them
from diffmem.cli import experiments, audit, detect, mitigate, compare  # noqa: F401
# isort: on
from diffmem.cli.app import app, main, process_group

__all__ = ["app", "main", "process_group"]
