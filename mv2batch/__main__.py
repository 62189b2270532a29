"""`python -m mv2batch`: the same CLI as the `mv2batch` console script."""

from .cli import main

main()
