"""gcsd: the cluster's control store (Ray's GCS) as its own daemon.

Modules, one job each:
  tables       the TableStore interface, write ops, and the LMDB implementation
  replication  the Replication interface and its single-replica implementation
  liveness     which nodes have gone quiet for too long (pure)
  core         the request state machine: request maps in, replies and publications out
  server       the ZeroMQ ROUTER/PUB loop around the core (I/O shell)
  __main__     flags, config, data-dir lock, lifecycle
"""
