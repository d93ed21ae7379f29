"""gRPC scaffolding shared by every service: server, client channels, errors, auth, metrics."""
