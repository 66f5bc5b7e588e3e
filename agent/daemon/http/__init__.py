"""The HTTP API on the box: OpenAI- and Ollama-compatible endpoints over the agent's job queue.

``api`` maps the two dialects onto the job contract (pure); ``server`` serves
them with the standard library and submits every request to the same intake
as MQTT jobs (``agent.daemon.inbox.Inbox.submit``).  See docs/http-api.md.
"""
