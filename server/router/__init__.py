"""The router hop: forwarding of the four hops' services to their replicas."""
