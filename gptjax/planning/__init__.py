"""Memory planning (consumes config, sharding, model, training; nothing imports it but the CLI)."""
