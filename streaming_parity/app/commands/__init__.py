"""``parity`` subcommands that belong to one backend's artifacts (registered through the registry's ``cli``)."""
