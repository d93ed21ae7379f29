"""Model construction and loading: tiny models built from a config, no hub."""
