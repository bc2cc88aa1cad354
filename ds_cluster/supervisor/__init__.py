"""The local supervisor: starts, watches and restarts a cluster's processes on one machine."""
