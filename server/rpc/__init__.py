"""The gRPC API: servicer, error/auth/metrics interceptor, server lifecycle, client helpers."""
