"""The wire contract: generated protobuf/gRPC code and the packet helpers.

`pb` is the generated message module, `pb_grpc` the generated service stubs.
"""

from shared.protocol.gen.splitvlm.v1 import splitvlm_pb2 as pb
from shared.protocol.gen.splitvlm.v1 import splitvlm_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
