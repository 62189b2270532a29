"""`python -m mv2batch`: the same CLI as the `mv2batch` console script."""

from mv2batch.cli.app import main

main()
