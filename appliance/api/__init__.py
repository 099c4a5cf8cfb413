"""The gRPC API: server, service, the result feed, auth, TLS and metrics."""
