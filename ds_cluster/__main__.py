"""`python -m ds_cluster`: the same as the `ds-cluster` command."""

import sys

from ds_cluster.cli import main

sys.exit(main())
