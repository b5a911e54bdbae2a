"""`python -m dogtl ...`: the same as the `dogtl` command."""

from dogtl.cli.__main__ import run

run()
