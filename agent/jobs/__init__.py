"""Jobs: the durable queue (``store``) that makes every job answered exactly once."""
