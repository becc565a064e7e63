"""A package that is no installed app: the refill task must never import from it."""
