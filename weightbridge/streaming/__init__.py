"""Phase 2 of a conversion: execute a plan, streaming tensors from a reader into shards."""
