"""Search engines: the exact torch engine, faiss import and GPU plumbing, and one faiss index of any kind."""
