"""gRPC service, health, reflection and metrics."""
