"""m2chat-lite: build M²Chat, a multimodal LLM that writes interleaved text and images, step by step.

Notebook ``00_welcome`` is the map of the course; each module's docstring names the notebook that
teaches it.
"""

__version__ = "0.1.0"
