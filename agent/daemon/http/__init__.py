"""The HTTP API on the box: OpenAI- and Ollama-compatible endpoints over the agent's job queue.

``edge_contract.openai_compat`` maps the two dialects onto the job contract
(pure, shared with the fleet's gateway).  Here: ``routes`` decides what a
request is answered (pure), ``handler`` does one connection's I/O, ``waiting``
is how a request waits for its job (the reply sink, the connection watcher),
and ``server`` is the server's life; every request goes to the same intake as
MQTT jobs (``agent.daemon.inbox.Inbox.submit``).  See docs/http-api.md.
"""
