"""clustermesh: multi-cluster global Services for Kubernetes."""

__version__ = "0.1.0"
