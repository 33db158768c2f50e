"""Keeping audio ahead of the listener: the engine threads, the real-time capacity model
that admission reads, the playback clock, and the CPU budget the services divide,
with no RPC in them so the engines can use them directly."""
