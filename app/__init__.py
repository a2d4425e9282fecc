"""The chat app: a Gradio UI over a service that owns the session store and the chat engine.

Data flows one way: ``ui`` -> ``service`` -> (``store``, ``engine``). Nothing in ``engine``
imports from here.
"""
