"""stored: the node's shared-memory object store (Plasma's design, in Python).

Modules, one job each:
  allocator  first-fit placement of objects inside the arena (pure)
  eviction   LRU choice of cached objects to drop (pure)
  messages   wire maps -> validated request nouns (pure)
  store      object table, pins and pending gets (pure core)
  transfer   the stored-to-stored TCP protocol and its zero-copy reader (pure)
  pull       which pulls to run, from which source, when to give up (pure)
  server     the selector loop that moves bytes and fds (I/O shell)
  peers      the TCP half of that loop: serving and pulling objects (I/O shell)
  __main__   flags, config, arena creation, lifecycle
"""
