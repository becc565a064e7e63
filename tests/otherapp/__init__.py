"""A second test app whose models share names with testapp's (cache keys must tell them apart)."""
