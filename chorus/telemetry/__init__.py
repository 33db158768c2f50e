"""How a request is seen from outside: one trace across the three services, the RPC spans
and request metrics, and the names the tiers are known by, shared so every service reports alike."""
