"""The AlignDiff web service: FastAPI routes, persistence, storage and auth around the core."""
