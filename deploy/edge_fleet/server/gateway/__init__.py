"""The fleet's OpenAI- and Ollama-compatible gateway (issue 25): ``mount(app)``; see docs/http-api.md."""

from .api import mount

__all__ = ["mount"]
