"""How a Chorus service stands up and talks gRPC: its server, channels, common entry point,
health probe, reflection, request parsing, peer discovery and the stall watch on calls, kept
apart from what the services compute so every service serves and fails the same way."""
