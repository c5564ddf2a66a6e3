"""The search service: a saved index served over HTTP (FastAPI)."""
