"""Users and their API keys: the in-memory store (:mod:`.store`), its place in the change log other gateways
write (:mod:`.changelog`), the SQL databases (:mod:`.database`), the key guard (:mod:`.keys`) and the user API
(:mod:`.api`).
"""
