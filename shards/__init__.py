"""Floor 1: everything on disk (image folders, paired sets, shards, embeddings, atomic writes)."""
