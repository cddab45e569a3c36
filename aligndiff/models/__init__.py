"""Model loading: real weights by local path or hub id, or tiny random models built from config."""
