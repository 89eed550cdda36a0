"""The video server behind gradio_server.py: a Gradio page and an OpenAI-style /v1/videos API over one
persistent SQLite job queue, served by one worker that owns the loaded sampler.

Modules: schema (request fields and limits), store (the queue), worker (runs jobs; torchrun followers),
service (what both front ends share), api (/v1 routes, JSON errors), page (the Gradio page), main (start-up).
"""
