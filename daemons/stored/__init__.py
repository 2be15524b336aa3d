"""stored: the node's shared-memory object store (Plasma's design, in Python).

Modules, one job each:
  allocator  first-fit placement of objects inside the arena (pure)
  eviction   LRU choice of cached objects to drop (pure)
  messages   wire maps -> validated request nouns (pure)
  store      object table, pins and pending gets (pure core)
  server     the selector loop that moves bytes and fds (I/O shell)
  __main__   flags, config, arena creation, lifecycle
"""
