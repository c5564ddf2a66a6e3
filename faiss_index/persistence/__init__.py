"""Index folders on disk: the layout, saving, loading, verifying, and the zarr embedding store."""
