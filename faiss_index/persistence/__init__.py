"""Index folders on disk: the layout, saving, loading, verifying, and the zarr embedding store.

Only this package knows the folder format (:mod:`.layout`); everything outside it goes through
these functions.
"""
from .embeddings import create_embeddings, keys_by_id, read_embedding_rows, stored_keys, write_embedding_rows
from .layout import carried_entries, is_index_dir, read_manifest, staging_folder
from .load import index_stats, load_index
from .save import save_index
from .verify import verify_index

__all__ = ["save_index", "load_index", "verify_index", "index_stats", "is_index_dir", "read_manifest",
           "carried_entries", "staging_folder", "create_embeddings", "write_embedding_rows", "read_embedding_rows",
           "stored_keys", "keys_by_id"]
