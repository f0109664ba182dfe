"""This cluster's Kubernetes objects as the mesh sees them: the export rules (Services,
EndpointSlices, Nodes -> records) and the slim state both the operator and the agent keep.
Pure; below the operator and the agent, which both use it."""
