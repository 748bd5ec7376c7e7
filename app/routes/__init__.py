"""The HTTP API by area: one module per area, each with a module-level `router`.

app.api includes them all; a new area is a new module here plus one include
line there. Routes validate, enqueue and read state; nothing else.
"""
