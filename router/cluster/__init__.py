"""Router replicas across machines: leader election by a Kubernetes Lease (`lease`) and engine
replicas found by DNS (`dns`)."""
