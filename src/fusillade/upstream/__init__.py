"""Calls to OpenAI-compatible upstreams: routes, the aiohttp client, SSE reading and reassembly, and the
classification of what came back into success, retriable or permanent failure."""
