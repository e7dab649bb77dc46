"""gradesvc: a replicated in-memory store of user grades."""
