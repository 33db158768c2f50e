"""Who may talk to whom: TLS between tiers, API keys, and the one access policy every door
(gRPC or HTTP) asks, kept in one room so a security review reads one place."""
