"""`python -m reco_qdrant.cli`: the `reco` command."""

from . import main

main()
