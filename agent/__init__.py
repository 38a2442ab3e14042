"""node-agent: a self-hosted inference node agent (vLLM in-process, llama.cpp as the fallback)."""

__version__ = "0.1.0"
