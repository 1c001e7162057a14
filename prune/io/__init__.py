"""Reading and writing the data: input shards (tar), the pruned shard writer, storage (fsspec, atomic
writes) and the per-shard Parquet tables of the output directory."""
