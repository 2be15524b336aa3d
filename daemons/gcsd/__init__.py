"""gcsd: the cluster's control store (Ray's GCS) as its own daemon: sharded, chain-replicated.

Modules, one job each (see docs/gcs.md):
  tables          the TableStore interface, write ops, and the LMDB implementation
  replication     the Replication interface, single-replica commit, local reads for chains
  liveness        which nodes have gone quiet for too long (pure)
  core            the request state machine: request maps in, plans, replies and publications out
  chain           chain replication of one shard (pure state machine)
  master          the chain master: placement, failures, joins, epochs (pure)
  wire            chain messages to and from msgpack maps, checked
  shardstore      one replica's LMDB: entries, log, dedup, snapshots
  server          the member's ZeroMQ loop around core + chain (I/O shell)
  master_server   the master's ZeroMQ loop and durable state file (I/O shell)
  __main__        flags, config, data-dir lock, lifecycle
"""
