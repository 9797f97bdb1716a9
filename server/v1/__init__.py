"""Generated protobuf/gRPC stubs of proto/bitserve/v1 (scripts/gen_proto.py). Do not edit."""
