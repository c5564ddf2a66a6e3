"""The index classes: the shared base, exact, faiss-backed, distributed over processes, and the factory."""
