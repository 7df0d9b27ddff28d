"""diffsplit.transport: the wire (envelope codec, tensor frames, ZeroMQ sockets).

A leaf package: it imports nothing else of diffsplit.
"""
