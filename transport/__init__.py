"""diffsplit.transport: the wire (envelope codec, tensor frames, ZeroMQ sockets).

A leaf package: it imports nothing else of diffsplit. This file imports
nothing either, so ``diffsplit.transport.errors`` stays cheap for everyone.

- ``envelope``: ``encode``/``decode``/``describe``/``content_digest``, ``Limits``.
- ``sockets``: ``Client`` (DEALER); ``server``: ``Server`` (ROUTER), ``Request``.
- ``protocol``: reserved ops, heartbeat rules, ``Settings``.
- ``auth``: CURVE key pairs and key files, ``ServerCurve``/``ClientCurve``.
- ``errors``: ``DiffsplitError`` and the transport's errors.
- internals: ``codec`` (msgpack hooks), ``tensors`` (bytes views), ``limits``,
  ``digest``, ``iothread``.
"""
