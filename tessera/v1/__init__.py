"""Generated Python code for the tessera.v1 wire contract. Do not edit the generated modules.

The ``.proto`` sources in ``proto/tessera/v1/`` are the only definition of the wire; docs/wire.md
describes them. Every ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*.pyi`` file here is produced by
``python proto/generate.py`` and committed; tests/test_proto_sync.py fails when they are stale.
This file is the only hand-written one in the package.

Import the modules under short aliases, and only at the edge (servicers, clients, conversions)::

    from tessera.v1 import relay_pb2 as relay_pb
    from tessera.v1 import relay_pb2_grpc as relay_grpc
"""
