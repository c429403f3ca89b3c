"""Launch: config, distributed init, entry points."""
