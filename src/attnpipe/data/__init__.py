"""Data stages: fetch sources, prepare (validate + split), shard, and the loaders."""
